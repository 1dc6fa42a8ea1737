"""Videos: frame sampling, timestamps, resizing and patches as Hugging Face's Qwen3-VL video processor
computes them; decoding files and frame directories; bad videos skipped and counted; the video
pipeline deterministic and resumable; the default clip set."""

import __future__
import ast
import importlib.util
import json
import logging
import math
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen_jax.config import TINY, VISION_PRESETS
from qwen_jax.data import (
    MM_ROW_KEYS,
    VIDEO_ROW_KEYS,
    VISION_TOKENS,
    ImageProcessorConfig,
    VideoError,
    VideoProcessorConfig,
    add_vision_tokens,
    camera_move_records,
    load_image_text_jsonl,
    load_video,
    make_mm_eval_batches,
    make_mm_train_iterator,
    moving_digit_records,
    pack_mm_corpus,
    preprocess_video,
    python_docs_corpus,
    train_bpe_tokenizer,
)
from qwen_jax.data.clips import digit_clip
from qwen_jax.data.videos import frame_timestamps, sample_frame_indices, video_smart_resize

TINY_VIDEOS = VideoProcessorConfig(min_pixels=32 * 32, max_pixels=4 * 64 * 64, max_frames=8)


def hf_functions(module: str, *names: str, namespace: dict) -> types.SimpleNamespace:
    """Top-level functions or methods `names` of an installed transformers module, taken from its
    source: the video processor's module cannot be imported without torchvision, which has no
    build for the CPU torch pinned here, but these functions need only math, numpy and torch."""
    path = Path(importlib.util.find_spec("transformers").origin).parent / module
    tree = ast.parse(path.read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names and node.name not in found:
            scope = dict(namespace)
            # Annotations stay strings: they name classes that the module imports.
            exec(compile(ast.Module([node], []), str(path), "exec",
                         flags=__future__.annotations.compiler_flag), scope)
            found[node.name] = scope[node.name]
    assert set(found) == set(names), f"{module} no longer defines {set(names) - set(found)}"
    return types.SimpleNamespace(**found)


HF = hf_functions("models/qwen3_vl/video_processing_qwen3_vl.py", "smart_resize", "sample_frames",
                  "patchify", namespace={"math": math, "np": np, "torch": torch,
                                         "logger": logging.getLogger("transformers")})
HF_TIMESTAMPS = hf_functions("models/qwen3_vl/processing_qwen3_vl.py", "_calculate_timestamps",
                             namespace={})._calculate_timestamps


@pytest.mark.parametrize("frames, height, width", [(4, 64, 64), (5, 100, 300), (9, 427, 640),
                                                   (3, 20, 50), (16, 1080, 1920), (6, 40, 7000)])
@pytest.mark.parametrize("budget", [(32 * 32, 4 * 64 * 64), (128 * 32 * 32, 768 * 32 * 32)])
def test_resized_sizes_are_hf_smart_resize(frames, height, width, budget):
    config = VideoProcessorConfig(min_pixels=budget[0], max_pixels=budget[1])
    expected = HF.smart_resize(frames, height, width, temporal_factor=2, factor=32,
                               min_pixels=budget[0], max_pixels=budget[1])
    assert video_smart_resize(frames, height, width, config) == expected


def test_clips_hf_refuses_are_refused_with_a_reason():
    for frames, height, width, reason in ((6, 33, 7000, "extreme_aspect_ratio"),
                                          (1, 64, 64, "video_too_short")):
        with pytest.raises(ValueError):
            HF.smart_resize(frames, height, width, factor=32)
        with pytest.raises(VideoError) as error:
            video_smart_resize(frames, height, width, VideoProcessorConfig())
        assert error.value.reason == reason


@pytest.mark.parametrize("total, fps", [(8, 4.0), (10, 4.0), (300, 30.0), (1000, 24.0), (3, 2.0),
                                        (17, 2.5), (2000, 1.0)])
def test_frame_indices_and_timestamps_are_hf(total, fps):
    config = VideoProcessorConfig(max_frames=64)
    metadata = types.SimpleNamespace(total_num_frames=total, fps=fps)
    processor = types.SimpleNamespace(fps=config.fps, min_frames=config.min_frames,
                                      max_frames=config.max_frames)
    expected = HF.sample_frames(processor, metadata)
    indices = sample_frame_indices(total, fps, config)
    np.testing.assert_array_equal(indices, expected)
    assert frame_timestamps(indices, fps) == tuple(HF_TIMESTAMPS(None, expected, fps))


def test_patches_are_hf_patchify_with_the_last_frame_repeated():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)  # odd: the last is repeated
    indices = np.arange(5)
    config = VideoProcessorConfig(min_pixels=32 * 32, max_pixels=5 * 64 * 96, min_frames=1)
    video = preprocess_video(frames, 2.0, config)
    assert video.grid_thw == (3, 4, 6)
    normalised = (frames.astype(np.float64) / 255).astype(np.float32) * 2 - 1  # mean = std = 0.5
    clip = torch.as_tensor(normalised.transpose(0, 3, 1, 2)[None])  # [1, T, C, H, W]
    expected, *grid = HF.patchify(None, clip, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert tuple(grid) == video.grid_thw
    np.testing.assert_allclose(video.pixel_values, expected[0].numpy(), atol=1e-6)
    assert video.timestamps == tuple(HF_TIMESTAMPS(None, indices, 2.0))


def write_mp4(path, frames, fps=8):
    """uint8 [T, H, W, 3] -> an MPEG-4 file (lossy) of `fps` frames per second."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def moving_square(count=12, size=64):
    """A bright square crossing a dark frame: uint8 [count, size, size, 3]."""
    frames = np.full((count, size, size, 3), 30, np.uint8)
    for index, frame in enumerate(frames):
        left = index * (size - 16) // (count - 1)
        frame[24:40, left:left + 16] = (250, 200, 40)
    return frames


def test_a_video_file_and_a_frame_directory_decode_to_the_clip(tmp_path):
    frames = moving_square()
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    expected = preprocess_video(frames, 8.0, TINY_VIDEOS)
    # A directory is lossless: the same values; its fps comes from the caller.
    from_folder = load_video(folder, TINY_VIDEOS, fps=8.0)
    np.testing.assert_array_equal(from_folder.pixel_values, expected.pixel_values)
    # Frames 0, 4, 7, 11 of 12 (4 is min_frames): patches at 0.25 s and 1.125 s.
    assert from_folder.timestamps == expected.timestamps == (0.25, 1.125)
    write_mp4(tmp_path / "clip.mp4", frames, fps=8)
    from_file = load_video(tmp_path / "clip.mp4", TINY_VIDEOS)  # the container's 8 fps
    assert from_file.grid_thw == expected.grid_thw and from_file.timestamps == expected.timestamps
    # MPEG-4 is lossy: close to the frames, not equal (pixels are in [-1, 1]).
    assert np.abs(from_file.pixel_values - expected.pixel_values).mean() < 0.05


@pytest.mark.parametrize("make, reason", [
    (lambda d: d / "missing.mp4", "missing_video"),
    (lambda d: junk_file(d), "corrupt_video"),
    (lambda d: truncated_mp4(d), "corrupt_video"),
    (lambda d: frame_folder(d, corrupt=True), "corrupt_video"),
    (lambda d: frame_folder(d, count=1), "video_too_short"),
    (lambda d: frame_folder(d, count=0), "empty_video"),
    (lambda d: frame_folder(d, mixed_sizes=True), "frame_size_mismatch"),
])
def test_bad_videos_raise_a_named_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(VideoError, match=str(path.name)) as error:
        load_video(path, TINY_VIDEOS, fps=4.0)
    assert error.value.reason == reason


def junk_file(folder):
    (folder / "junk.mp4").write_bytes(b"not a video" * 20)
    return folder / "junk.mp4"


def truncated_mp4(folder):
    write_mp4(folder / "full.mp4", moving_square())
    (folder / "cut.mp4").write_bytes((folder / "full.mp4").read_bytes()[:400])
    return folder / "cut.mp4"


def frame_folder(folder, *, count=4, corrupt=False, mixed_sizes=False):
    frames = folder / "clip7"  # a name no message holds unless it names the directory
    frames.mkdir()
    for index, frame in enumerate(moving_square(max(count, 2))[:count]):
        size = 48 if mixed_sizes and index == 2 else 64
        Image.fromarray(frame).resize((size, size)).save(frames / f"{index}.png")
    if corrupt:
        (frames / "2.png").write_bytes((frames / "2.png").read_bytes()[:60])
    return frames


@pytest.fixture(scope="module")
def tokenizer_and_config():
    tokenizer = train_bpe_tokenizer(python_docs_corpus()[:20], 500, tuple(VISION_TOKENS.values()))
    config = TINY.replace(vocab_size=500, vision=VISION_PRESETS["tiny"], **add_vision_tokens(tokenizer))
    return tokenizer, config


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A JSONL file of video records: an mp4, a frame directory, and four bad ones."""
    folder = tmp_path_factory.mktemp("videos")
    frames = moving_square()
    write_mp4(folder / "square.mp4", frames)
    (folder / "frames").mkdir()
    for index, frame in enumerate(frames[::-1]):
        Image.fromarray(frame).save(folder / "frames" / f"{index:02d}.png")
    (folder / "broken.mp4").write_bytes(b"\x00" * 500)
    lines = [{"parts": [{"video": "square.mp4"}, {"text": "A square moves right."}]},
             {"parts": [{"text": "Now:"}, {"video": "frames", "fps": 6},
                        {"text": "a square moves left."}]},
             {"parts": [{"video": "broken.mp4"}, {"text": "Broken."}]},
             {"parts": [{"video": "gone.mp4"}, {"text": "Gone."}]},
             {"parts": [{"video": "frames", "fps": -1}, {"text": "Bad fps."}]},
             {"parts": [{"video": "frames", "fps": 4}, {"text": "   "}]}]
    (folder / "videos.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return folder


def test_video_records_load_and_bad_ones_are_skipped_and_counted(video_folder):
    records, skipped = load_image_text_jsonl(video_folder / "videos.jsonl", ImageProcessorConfig(),
                                             video_config=TINY_VIDEOS)
    assert skipped == {"bad_field": 1, "corrupt_video": 1, "empty_document": 1, "missing_video": 1}
    assert [len(record.videos) for record in records] == [1, 1]
    # Frames 0, 4, 7, 11 of 12, timed at 8 fps (the file's) and at 6 fps (the record's).
    assert [record.videos[0].timestamps for record in records] == [(0.25, 1.125), (1 / 3, 1.5)]
    with pytest.raises(ValueError, match=r"videos\.jsonl:3: corrupt_video: .*broken\.mp4"):
        load_image_text_jsonl(video_folder / "videos.jsonl", ImageProcessorConfig(), strict=True,
                              video_config=TINY_VIDEOS)


@pytest.fixture(scope="module")
def video_corpora(tokenizer_and_config):
    tokenizer, config = tokenizer_and_config
    budget = dict(seq_len=96, max_patches=32, max_video_patches=64)
    clips = moving_digit_records(TINY_VIDEOS, limit=24) + camera_move_records(TINY_VIDEOS)
    return {"text": pack_mm_corpus(tokenizer, python_docs_corpus()[20:28], config, **budget),
            "videos": pack_mm_corpus(tokenizer, clips, config, **budget)}


def test_video_rows_hold_their_clips_and_never_train_on_them(video_corpora, tokenizer_and_config):
    _, config = tokenizer_and_config
    corpus = video_corpora["videos"]
    assert corpus.row_keys == MM_ROW_KEYS + VIDEO_ROW_KEYS and not corpus.skipped
    patches = []
    for index in range(corpus.num_rows):
        row = corpus.row(index)
        grids = row["video_grid_thw"][:row["num_videos"]]
        used = int(np.prod(grids, axis=1).sum())
        # Each temporal patch is one block of h * w / 4 video tokens.
        assert (row["input_ids"] == config.video_token_id).sum() == used // 4
        assert (row["input_ids"] == config.vision_start_token_id).sum() == grids[:, 0].sum()
        assert not row["pixel_values_videos"][used:].any() and not row["num_images"]
        patches.append(row["pixel_values_videos"][:used])
        # Targets inside a video (its timestamps too) are never scored; the caption is.
        first_block = np.argmax(row["input_ids"] == config.vision_start_token_id)
        assert not row["loss_mask"][first_block - 3:first_block].any()
        assert row["loss_mask"].sum() > 0
    expected = [video.pixel_values for document in corpus.documents for video in document.videos]
    np.testing.assert_array_equal(np.concatenate(patches), np.concatenate(expected))


def test_video_pipeline_is_deterministic_and_resumes(video_corpora):
    def batches(state=None, count=5):
        iterator = make_mm_train_iterator(video_corpora, global_batch_size=4, seed=5)
        if state is not None:
            iterator.set_state(state)
        return [next(iterator) for _ in range(count)], iterator.get_state()

    first, _ = batches()
    again, _ = batches()
    _, state = batches(count=2)
    resumed, _ = batches(json.loads(json.dumps(state)), count=3)
    for got, want in zip(again + resumed, first + first[2:]):
        assert got.keys() == set(MM_ROW_KEYS + VIDEO_ROW_KEYS)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert sum(batch["num_videos"].sum() for batch in first) > 0
    eval_batch = make_mm_eval_batches(video_corpora["videos"], batch_size=4, max_batches=1)[0]
    assert eval_batch["pixel_values_videos"].shape == (4, 64, 1536)


def test_the_default_clips_move_as_their_captions_say():
    ink = np.zeros((8, 8))
    ink[2:6, 3:5] = 16
    right = digit_clip(ink, "left to right")
    down = digit_clip(ink, "top to bottom")
    columns = [np.nonzero(frame.any(axis=0))[0].mean() for frame in right]
    rows = [np.nonzero(frame.any(axis=1))[0].mean() for frame in down]
    assert np.all(np.diff(columns) > 0) and np.all(np.diff(rows) > 0)
    records = moving_digit_records(TINY_VIDEOS, limit=8) + camera_move_records(TINY_VIDEOS)
    assert len(records) == 16 and all(len(record.videos) == 1 for record in records)
    assert records[1].parts[1] == "A handwritten digit 1 moves right to left."
    assert records[8].parts[1] == "The camera pans right across a photo of a Chinese temple among trees."
    assert {record.videos[0].grid_thw for record in records} == {(2, 4, 4), (2, 2, 4)}
