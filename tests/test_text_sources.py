"""Pretraining on your own text: JSONL, ArrayRecord and .txt files, bad records skipped and counted
(strict: named), and a run that trains on them."""

import json

import pytest

from qwen_jax.config import ConfigError
from qwen_jax.data.mm_sources import write_image_text_array_record
from qwen_jax.data.text_sources import load_text_file
from qwen_jax.experiment import load_config
from qwen_jax.train.datasets import load_text_documents
from qwen_jax.train.loop import run_training

GOOD = [{"text": "first document"}, {"text": "second", "source": "web"}]
# One bad line of every kind, among good ones; the blank line is no record at all.
LINES = [json.dumps(GOOD[0]).encode(), b"{not json", b"[1, 2]", json.dumps({"body": "x"}).encode(),
         json.dumps({"text": 7}).encode(), json.dumps({"text": "  \n"}).encode(), b"\xff\xfe{}", b"",
         json.dumps(GOOD[1]).encode()]
SKIPPED = {"bad_field": 1, "bad_json": 3, "empty_document": 1, "missing_field": 1}


def test_jsonl_keeps_the_good_documents_in_order_and_counts_the_bad(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    assert load_text_file(path) == (["first document", "second"], SKIPPED)
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: bad_json"):
        load_text_file(path, strict=True)


def test_array_record_and_txt_files(tmp_path):
    shard = tmp_path / "corpus.array_record"
    write_image_text_array_record(shard, GOOD + [{"text": ""}, {"parts": []}])
    assert load_text_file(shard) == (["first document", "second"], {"empty_document": 1, "missing_field": 1})
    with pytest.raises(ValueError, match=r"corpus.array_record\[2\]: empty_document"):
        load_text_file(shard, strict=True)
    (tmp_path / "a.txt").write_text("a whole file\nis one document\n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe not UTF-8")
    assert load_text_file(tmp_path / "a.txt") == (["a whole file\nis one document\n"], {})
    assert load_text_file(tmp_path / "b.txt") == ([], {"not_utf8": 1})
    with pytest.raises(ValueError, match=r"b.txt: not_utf8"):
        load_text_file(tmp_path / "b.txt", strict=True)


def test_text_sources_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data.text_sources entry 'corpus.csv' is neither 'python_docs'"):
        load_text_documents(["corpus.csv"], strict=False)
    (tmp_path / "bad.jsonl").write_bytes(b"{not json\n")
    with pytest.raises(ConfigError, match=r"hold no usable document \(skipped: \{'bad_json': 1\}\)"):
        load_text_documents([str(tmp_path / "bad.jsonl")], strict=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_text_documents([str(tmp_path / "missing.jsonl")], strict=False)


def test_a_run_trains_on_a_jsonl_corpus_and_reports_what_it_skipped(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    documents = [{"text": " ".join(words[(i + j) % 8] for j in range(40 + i % 7))} for i in range(300)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(map(json.dumps, documents)) + "\n{not json\n")
    config = load_config("configs/pretrain_tiny.py", [
        "wandb.mode=disabled", "train.steps=2", "train.eval_every=2", "train.batch_size=8", "train.seq_len=32",
        "model.vocab_size=300", "model.num_hidden_layers=2", f"data.text_sources=['{corpus}']"])
    rows = run_training(config, tmp_path / "run")
    assert rows[0]["data/skipped/bad_json"] == 1 and rows[-1]["eval/loss"] > 0
    tokenizer = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert "epsilon" in tokenizer["model"]["vocab"]  # trained on this corpus, not Python's docs
