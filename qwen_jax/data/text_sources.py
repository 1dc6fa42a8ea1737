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

import collections
import json
from pathlib import Path

TEXT_FILE_SUFFIXES = (".jsonl", ".array_record", ".txt")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text_of(record: bytes) -> str:
    """One JSON object's "text", or raise _Skip."""
    try:
        document = json.loads(record.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Skip("bad_json", str(error)) from None
    if not isinstance(document, dict):
        raise _Skip("bad_json", f"a JSON {type(document).__name__}, not an object")
    if "text" not in document:
        raise _Skip("missing_field", f"no 'text' among {sorted(document)}")
    text = document["text"]
    if not isinstance(text, str):
        raise _Skip("bad_field", f"'text' is a {type(text).__name__}")
    if not text.strip():
        raise _Skip("empty_document", "no text but whitespace")
    return text


def _read(records, strict: bool) -> tuple[list[str], dict[str, int]]:
    """(where, JSON bytes) pairs -> the documents and the skip counts by reason."""
    documents, skipped = [], collections.Counter()
    for where, record in records:
        try:
            documents.append(_text_of(record))
        except _Skip as skip:
            if strict:
                raise ValueError(f"{where}: {skip.reason}: {skip}") from None
            skipped[skip.reason] += 1
    return documents, dict(sorted(skipped.items()))


def load_text_file(path: str | Path, *, strict: bool = False) -> tuple[list[str], dict[str, int]]:
    """The documents of a .jsonl, .array_record or .txt file in file order, and the skip counts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            if strict:
                raise ValueError(f"{path}: not_utf8: {error}") from None
            return [], {"not_utf8": 1}
        if not text.strip():
            if strict:
                raise ValueError(f"{path}: empty_document: no text but whitespace")
            return [], {"empty_document": 1}
        return [text], {}
    if path.suffix == ".jsonl":
        with open(path, "rb") as file:  # bytes: one line that is not UTF-8 must not stop the file
            return _read([(f"{path}:{number}", line) for number, line in enumerate(file, start=1)
                          if line.strip()], strict)
    if path.suffix == ".array_record":
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(path))
        try:
            return _read([(f"{path}[{index}]", record) for index, record in enumerate(reader.read_all())],
                         strict)
        finally:
            reader.close()
    raise ValueError(f"{path}: a text source must end in one of {TEXT_FILE_SUFFIXES}")
