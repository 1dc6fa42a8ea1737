"""A byte-level BPE tokenizer trained on the corpus, saved once per run so a resumed run sees the same ids."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # in id order: eos is 0, pad is 1


def train_bpe_tokenizer(texts: list[str], vocab_size: int,
                        extra_special_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-split, no normaliser so decode(encode(x)) == x) of `vocab_size`
    ids; `extra_special_tokens` (e.g. the vision tokens) take ids right after eos and pad."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a document's first word encodes as written, keeping the round trip exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        # All 256 byte symbols, seen or not, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def load_or_train_tokenizer(path: Path, texts: list[str], vocab_size: int,
                            extra_special_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """Load `path` if it exists, else train on `texts` and save it there atomically (tmp + rename)."""
    path = Path(path)
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = train_bpe_tokenizer(texts, vocab_size, extra_special_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A crash mid-write must not leave a truncated tokenizer.json that a resumed run would load.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False,
                                     encoding="utf-8") as tmp:
        tmp.write(tokenizer.to_str())
    os.replace(tmp.name, path)
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of `<|endoftext|>`, appended after every document."""
    return tokenizer.token_to_id(EOS_TOKEN)


def pad_id(tokenizer: Tokenizer) -> int:
    """Id of `<|pad|>`, filling the unused tail of the last packed row."""
    return tokenizer.token_to_id(PAD_TOKEN)
