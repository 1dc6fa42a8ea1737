"""A byte-level BPE tokenizer trained on the corpus, saved once per run so a resumed run sees the same ids."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen_jax.config import ConfigError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
END_OF_TURN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # in id order: eos is 0, pad is 1
# ChatML's turn markers, as in Qwen's tokenizer: every tokenizer trained here holds them, so a
# pretraining run can be fine-tuned on chat data (its vocab has no room left to add them then).
CHAT_TOKENS = ("<|im_start|>", END_OF_TURN)


def train_bpe_tokenizer(texts: list[str], vocab_size: int,
                        extra_special_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-split, no normaliser so decode(encode(x)) == x) of `vocab_size`
    ids; `extra_special_tokens` (e.g. the vision tokens) take ids right after eos and pad, then
    `CHAT_TOKENS`."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a document's first word encodes as written, keeping the round trip exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens, *CHAT_TOKENS],
        # All 256 byte symbols, seen or not, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def load_or_train_tokenizer(path: Path, texts, vocab_size: int, extra_special_tokens: tuple[str, ...] = (),
                            source: Path | None = None) -> Tokenizer:
    """Load `path` if it exists; else copy `source` (a tokenizer.json: init_from's) there, or train on
    `texts` (a list, or a function giving one) and save it there; atomically (tmp + rename)."""
    path = Path(path)
    if path.exists():
        return Tokenizer.from_file(str(path))
    if source is not None:
        tokenizer = Tokenizer.from_file(str(source))
        _check_copied(tokenizer, source, vocab_size, extra_special_tokens)
        text = Path(source).read_text(encoding="utf-8")  # the file as it is
    else:
        tokenizer = train_bpe_tokenizer(texts() if callable(texts) else texts, vocab_size, extra_special_tokens)
        text = tokenizer.to_str()
    write_text_atomically(path, text)
    return tokenizer


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it there: a crash mid-write must not
    leave a truncated file (a tokenizer, a chat template) that a resumed run would load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False,
                                     encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def _check_copied(tokenizer: Tokenizer, source: Path, vocab_size: int, needed: tuple[str, ...]) -> None:
    """A tokenizer taken as it is must fit the model's vocab and hold the tokens the run uses."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise ConfigError(f"{source} has {tokenizer.get_vocab_size()} token ids, more than "
                          f"model.vocab_size {vocab_size}")
    missing = [token for token in (EOS_TOKEN, *needed) if tokenizer.token_to_id(token) is None]
    if missing:
        raise ConfigError(f"{source} has no {missing} token(s), which this run needs")


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of `<|endoftext|>`, appended after every document."""
    return tokenizer.token_to_id(EOS_TOKEN)


def pad_id(tokenizer: Tokenizer) -> int:
    """Id of `<|pad|>`, filling the unused tail of the last packed row; a tokenizer without one (Qwen's own)
    pads with `<|endoftext|>`, as its model config says (padding is masked out either way)."""
    padding = tokenizer.token_to_id(PAD_TOKEN)
    return eos_id(tokenizer) if padding is None else padding


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Where a sampled reply ends: `<|endoftext|>`, and `<|im_end|>` (the end of a chat turn) where the
    tokenizer has one. Qwen3.5's configs name eos ids 248046 and 248044 (spec section 5): these two in
    Qwen's numbering, where <|endoftext|>, <|im_start|> and <|im_end|> follow each other."""
    return [tokenizer.token_to_id(token) for token in (END_OF_TURN, EOS_TOKEN)
            if tokenizer.token_to_id(token) is not None]
