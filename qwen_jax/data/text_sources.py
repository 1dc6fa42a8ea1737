"""Text corpora from files: JSONL and ArrayRecord files of {"text": ...} documents, or plain .txt
files (one document each). A bad record is skipped and counted by reason (strict: the first one
raises, naming the file and line or record):

    bad_json        the line (record) is not a UTF-8 JSON object
    missing_field   no "text" field
    bad_field       "text" is not a string
    empty_document  no text but whitespace: nothing to learn from
    not_utf8        a .txt file that is not UTF-8 text
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_jax.data.records import Skip, array_records, jsonl_records, parse_records

TEXT_FILE_SUFFIXES = (".jsonl", ".array_record", ".txt")


def json_text(record: bytes, where: str) -> str:
    """One JSON object's "text", or raise Skip."""
    try:
        document = json.loads(record.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Skip("bad_json", str(error)) from None
    if not isinstance(document, dict):
        raise Skip("bad_json", f"a JSON {type(document).__name__}, not an object")
    if "text" not in document:
        raise Skip("missing_field", f"no 'text' among {sorted(document)}")
    text = document["text"]
    if not isinstance(text, str):
        raise Skip("bad_field", f"'text' is a {type(text).__name__}")
    if not text.strip():
        raise Skip("empty_document", "no text but whitespace")
    return text


def file_text(record: bytes, where: str) -> str:
    """A .txt file's bytes -> its text, or raise Skip."""
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Skip("not_utf8", str(error)) from None
    if not text.strip():
        raise Skip("empty_document", "no text but whitespace")
    return text


def load_text_file(path: str | Path, *, strict: bool = False) -> tuple[list[str], dict[str, int]]:
    """The documents of a .jsonl, .array_record or .txt file in file order, and the skip counts."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return parse_records([(str(path), path.read_bytes())], file_text, strict)
    if path.suffix in (".jsonl", ".array_record"):
        read = jsonl_records if path.suffix == ".jsonl" else array_records
        return parse_records(read(path), json_text, strict)
    raise ValueError(f"{path}: a text source must end in one of {TEXT_FILE_SUFFIXES}")
