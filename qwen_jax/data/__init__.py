"""Training data: a corpus that ships with Python, a BPE tokenizer, packing, and Grain pipelines;
image and video preprocessing, image/video-text sources (and offline clips), and their packed and
mixed Grain pipeline for vision; chat conversations for supervised fine-tuning (conversations.py,
chat_stream.py)."""

from qwen_jax.data.clips import camera_move_records, moving_digit_records

from qwen_jax.data.images import (
    ImageError,
    ImageProcessorConfig,
    ProcessedImage,
    image_placeholder_length,
    patchify_frames,
    preprocess_image,
    smart_resize,
)
from qwen_jax.data.mm_packing import (
    VISION_TOKENS,
    add_vision_tokens,
    check_vision_tokens,
    load_hf_tokenizer,
)
from qwen_jax.data.mm_pipeline import (
    MM_ROW_KEYS,
    VIDEO_ROW_KEYS,
    MMBatchIterator,
    MMPackedCorpus,
    make_mm_eval_batches,
    make_mm_train_iterator,
    pack_mm_corpus,
    vision_tower_inputs,
)
from qwen_jax.data.mm_sources import (
    SKIP_REASONS,
    ImageTextRecord,
    digits_image_text_records,
    load_image_text_array_record,
    load_image_text_jsonl,
    sample_photo_records,
    write_image_text_array_record,
)
from qwen_jax.data.packing import ROW_KEYS, pack_documents, unigram_entropy
from qwen_jax.data.pipeline import (
    PackedCorpus,
    make_eval_batches,
    make_train_iterator,
    pack_corpus,
    tokenize_documents,
)
from qwen_jax.data.sources import python_docs_corpus, split_documents
from qwen_jax.data.tokenizer import eos_id, load_or_train_tokenizer, pad_id, train_bpe_tokenizer
from qwen_jax.data.videos import (
    ProcessedVideo,
    VideoError,
    VideoProcessorConfig,
    load_video,
    preprocess_video,
)

__all__ = [
    "MM_ROW_KEYS", "ROW_KEYS", "SKIP_REASONS", "VIDEO_ROW_KEYS", "VISION_TOKENS", "ImageError",
    "ImageProcessorConfig", "ImageTextRecord", "MMBatchIterator", "MMPackedCorpus", "PackedCorpus",
    "ProcessedImage", "ProcessedVideo", "VideoError", "VideoProcessorConfig", "add_vision_tokens",
    "camera_move_records", "check_vision_tokens", "digits_image_text_records", "load_video",
    "moving_digit_records", "preprocess_video",
    "eos_id", "image_placeholder_length", "load_hf_tokenizer", "load_image_text_array_record",
    "load_image_text_jsonl", "load_or_train_tokenizer", "make_eval_batches", "make_mm_eval_batches",
    "make_mm_train_iterator", "make_train_iterator",
    "pack_corpus", "pack_documents", "pack_mm_corpus", "pad_id", "patchify_frames",
    "preprocess_image", "python_docs_corpus", "sample_photo_records", "smart_resize",
    "split_documents", "tokenize_documents", "train_bpe_tokenizer", "unigram_entropy",
    "vision_tower_inputs", "write_image_text_array_record",
]
