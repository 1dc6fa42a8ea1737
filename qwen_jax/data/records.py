"""JSON records from JSONL and ArrayRecord files, each with where it came from, and the loop that parses
them, skipping and counting the bad ones (strict: the first one raises, naming it)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Skip(Exception):
    """Why a record is unusable: a reason (its `data/skipped/<reason>` key) and a detail naming the culprit."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def at(self, where: str) -> ValueError:
        """The error a strict reader raises: "<where>: <reason>: <detail>"."""
        return ValueError(f"{where}: {self.reason}: {self.detail}")


def jsonl_records(path: Path) -> list[tuple[str, bytes]]:
    """("file:line", bytes) of a JSONL file's non-blank lines, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as file:  # bytes: one line that is not UTF-8 must not stop the file
        # Blank lines hold no record; a trailing one is common.
        return [(f"{path}:{number}", line) for number, line in enumerate(file, start=1) if line.strip()]


def array_records(path: Path) -> list[tuple[str, bytes]]:
    """("file[index]", bytes) of an ArrayRecord file's records, in file order."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    reader = ArrayRecordReader(str(path))
    try:
        return [(f"{path}[{index}]", record) for index, record in enumerate(reader.read_all())]
    finally:
        reader.close()


def parse_records(records, parse: Callable[[bytes, str], Any], strict: bool) -> tuple[list, dict[str, int]]:
    """parse(record, where) of every (where, record); a Skip is counted by reason, or with strict raises
    ValueError("<where>: <reason>: <detail>"). -> (the parsed, {reason: count}, sorted)."""
    parsed, skipped = [], collections.Counter()
    for where, record in records:
        try:
            parsed.append(parse(record, where))
        except Skip as skip:
            if strict:
                raise skip.at(where) from None
            skipped[skip.reason] += 1
    return parsed, dict(sorted(skipped.items()))
