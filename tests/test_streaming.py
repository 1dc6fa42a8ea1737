"""A text corpus read as training goes (data.streaming): the same rows and eval batches as packing it
in memory, bad records counted as they are read, each host its own records, and an exact resume from
a state of a few numbers, inside a document and across epochs."""

import json

import numpy as np
import pytest

from qwen_jax.config import ConfigError
from qwen_jax.data import (make_eval_batches, pack_corpus, pack_documents, split_documents,
                           train_bpe_tokenizer)
from qwen_jax.data.mm_sources import write_image_text_array_record
from qwen_jax.data.sources import is_held_out
from qwen_jax.data.streaming import (TextStream, jsonl_line_starts, read_document, stream_eval_batches,
                                     text_records, texts_of)
from qwen_jax.data.text_sources import load_text_file
from qwen_jax.data.tokenizer import eos_id, pad_id
from qwen_jax.experiment import load_config
from qwen_jax.train.checkpoint import own_data_state
from resume_check import assert_resume_from_step_2_repeats_the_run

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
SEQ_LEN = 32


def documents(count: int) -> list[str]:
    """Documents of 3 to 90 words: many end inside a row, some span several."""
    return [" ".join(WORDS[(i * 7 + j * (i % 3 + 1)) % len(WORDS)] for j in range(3 + (i * 37) % 88))
            for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL file with bad lines among good ones, an ArrayRecord file and a .txt file; the good
    documents in source order; the skip counts of one pass."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = documents(120)
    lines = [json.dumps({"text": text}).encode() for text in texts[:80]]
    lines[5:5] = [b"{not json", b"", json.dumps({"body": "x"}).encode()]  # bad, blank, bad
    (folder / "web.jsonl").write_bytes(b"\n".join(lines))  # no newline after the last line
    write_image_text_array_record(folder / "books.array_record",
                                  [{"text": " "}] + [{"text": text} for text in texts[80:119]])
    (folder / "notes.txt").write_text(texts[119])
    sources = [str(folder / name) for name in ("web.jsonl", "books.array_record", "notes.txt")]
    skipped = {"bad_json": 1, "empty_document": 1, "missing_field": 1}
    return sources, texts, skipped


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe_tokenizer(corpus[1], 300)


def token_ids(tokenizer, texts):
    return [np.asarray(tokenizer.encode(text).ids, np.int32) for text in texts]


def assert_same_batches(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_records_are_indexed_in_source_order(corpus):
    sources, texts, _ = corpus
    records = text_records(sources)
    assert len(records) == 83 + 40 + 1  # 83 JSONL lines (one blank), 40 ArrayRecord records, one file
    assert records[5][0].endswith("web.jsonl:6") and read_document(records[6], strict=True) is None  # blank
    assert records[84][0].endswith("books.array_record[1]")
    assert list(texts_of(records, held_out=False, strict=False)) == split_documents(texts)[0]
    with pytest.raises(ValueError, match=r"web.jsonl:6: bad_json"):
        list(texts_of(records, held_out=False, strict=True))


def test_line_index_of_edge_case_files(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "crlf.jsonl").write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    np.testing.assert_array_equal(jsonl_line_starts(tmp_path / "empty.jsonl"), [0])
    np.testing.assert_array_equal(jsonl_line_starts(tmp_path / "crlf.jsonl"), [0, 15, 30])
    assert list(texts_of(text_records([str(tmp_path / "crlf.jsonl")]), held_out=False, strict=True)) == ["a", "b"]
    with pytest.raises(ConfigError, match="hold no records"):
        TextStream(text_records([str(tmp_path / "empty.jsonl")]), None, seq_len=8, global_batch_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        text_records([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match=r"neither one of \['python_docs'\] nor"):
        text_records(["corpus.csv"])


def test_the_stream_packs_the_rows_that_packing_in_memory_does(corpus, tokenizer):
    """In corpus order, one epoch of the stream is the in-memory packing of the train documents (all
    but its padded last row), and the bad records of the epoch are counted as they are read."""
    sources, texts, skipped = corpus
    train, _ = split_documents(texts)
    want = pack_documents(token_ids(tokenizer, train), seq_len=SEQ_LEN, eos_id=eos_id(tokenizer),
                          pad_id=pad_id(tokenizer))
    stream = TextStream(text_records(sources), tokenizer, seq_len=SEQ_LEN, global_batch_size=4, seed=None)
    full_batches = (len(want["input_ids"]) - 1) // 4
    got = [next(stream) for _ in range(full_batches)]
    for key, rows in want.items():
        np.testing.assert_array_equal(np.concatenate([batch[key] for batch in got]), rows[:4 * full_batches])
    assert stream.skipped == skipped  # the whole epoch is read by now
    assert load_text_file(sources[0])[1] | load_text_file(sources[1])[1] == skipped
    records_per_epoch = len(text_records(sources))
    while stream.get_state()["record"] < records_per_epoch + 100:  # past the bad ones of epoch 2
        next(stream)
    assert stream.skipped == {reason: 2 * n for reason, n in skipped.items()}


def test_eval_batches_are_the_in_memory_ones(corpus, tokenizer):
    sources, texts, _ = corpus
    _, held_out = split_documents(texts)
    want = make_eval_batches(pack_corpus(tokenizer, held_out, seq_len=SEQ_LEN), batch_size=2, max_batches=2)
    got = stream_eval_batches(text_records(sources), tokenizer, seq_len=SEQ_LEN, batch_size=2, max_batches=2)
    assert_same_batches(got, want)


def test_hosts_read_every_other_record(corpus, tokenizer):
    sources, texts, _ = corpus
    records = text_records(sources)
    for host in (0, 1):
        mine = [text for index in range(host, len(records), 2)
                if (text := read_document(records[index], strict=False)) is not None and not is_held_out(text)]
        want = pack_documents(token_ids(tokenizer, mine), seq_len=SEQ_LEN, eos_id=eos_id(tokenizer),
                              pad_id=pad_id(tokenizer))
        stream = TextStream(records, tokenizer, seq_len=SEQ_LEN, global_batch_size=4, seed=None,
                            process_index=host, process_count=2)
        got = np.concatenate([next(stream)["input_ids"] for _ in range(5)])  # 2 rows per host and batch
        np.testing.assert_array_equal(got, want["input_ids"][:10])


def test_resume_inside_a_document_and_across_epochs_is_exact(corpus, tokenizer):
    sources, _, _ = corpus
    records = text_records(sources)

    def stream():
        return TextStream(records, tokenizer, seq_len=SEQ_LEN, global_batch_size=4, seed=7)

    first = stream()
    states, batches = [], []
    for _ in range(90):  # an epoch is ~50 batches of 4 rows
        states.append(json.loads(json.dumps(first.get_state())))  # as a checkpoint keeps it
        batches.append(next(first))
    assert any(state["offset"] > 0 for state in states)  # some resume points are inside a document
    assert states[70]["record"] > len(records)  # and some in the second epoch
    for at in (0, 13, 70):
        resumed = stream()
        resumed.set_state(states[at])
        assert_same_batches([next(resumed) for _ in range(8)], batches[at:at + 8])
        assert resumed.get_state() == states[at + 8]
    assert batches[0]["input_ids"].tolist() != next(TextStream(
        records, tokenizer, seq_len=SEQ_LEN, global_batch_size=4, seed=8))["input_ids"].tolist()


def test_bad_records_stop_a_strict_stream_and_a_stream_with_no_train_document(tmp_path, corpus, tokenizer):
    strict = TextStream(text_records(corpus[0]), tokenizer, seq_len=SEQ_LEN, global_batch_size=4,
                        seed=None, strict=True)
    with pytest.raises(ValueError, match=r"web.jsonl:6: bad_json"):
        for _ in range(10):
            next(strict)
    (tmp_path / "bad.jsonl").write_bytes(b"{not json\n[1]\n")
    starved = TextStream(text_records([str(tmp_path / "bad.jsonl")]), tokenizer, seq_len=SEQ_LEN,
                         global_batch_size=1, seed=0)
    with pytest.raises(ConfigError, match=r"a whole epoch of records holds no train document \(skipped: \{'bad_json': 3"):
        next(starved)


def test_a_data_state_per_host():
    assert own_data_state({"processes": [{"record": 3}]}) == {"record": 3}
    assert own_data_state({"next_index": 5}) == {"next_index": 5}  # one state for all hosts
    with pytest.raises(ValueError, match="data states of 2 processes; this run has 1"):
        own_data_state({"processes": [{}, {}]})


def test_a_streaming_run_resumes_exactly_and_counts_what_it_skipped(corpus, tmp_path, capsys):
    sources, _, _ = corpus
    config = load_config("configs/pretrain_tiny.py", [
        "wandb.mode=disabled", "train.steps=4", "train.eval_every=2", "train.eval_batches=1",
        "train.batch_size=8", f"train.seq_len={SEQ_LEN}", "model.vocab_size=300",
        "model.num_hidden_layers=2", "checkpoint.every_steps=2", "data.streaming=True",
        f"data.text_sources={sources}"])
    workdir = tmp_path / "run"
    first = assert_resume_from_step_2_repeats_the_run(config, workdir, capsys)
    saved = [json.loads((workdir / "checkpoints" / step / "data" / "metadata").read_text())["processes"][0]
             for step in ("2", "4")]
    assert saved[0]["record"] > 0 and saved[1]["skipped"]  # bad records among the quarter epoch read
    assert {key: value for key, value in first[-1].items() if key.startswith("data/skipped/")} == {
        f"data/skipped/{reason}": count for reason, count in saved[1]["skipped"].items()}
