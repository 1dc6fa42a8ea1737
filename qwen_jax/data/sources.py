"""A real English-and-code corpus that ships with every Python: the help topics and stdlib docstrings.

No download is needed, so tests and demos train on real text on a machine without internet. The
corpus depends on the Python version (docstrings change between releases), which is why the
tokenizer is saved next to a run and why splits hash the text rather than its position.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings

# Pure-Python modules with long, stable docstrings. Fixed and ordered so the corpus is reproducible.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code",
    "codecs", "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "doctest", "email", "email.headerregistry", "email.message", "email.policy",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "importlib.metadata",
    "inspect", "ipaddress", "itertools", "json", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "multiprocessing.managers",
    "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics",
    "string", "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "wsgiref.handlers", "wsgiref.simple_server", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xmlrpc.client", "xmlrpc.server",
    "zipfile", "zipimport", "zoneinfo",
)
HELD_OUT_FRACTION = 0.05  # of the documents, for eval
MIN_DOCUMENT_CHARS = 200  # shorter docstrings are mostly one-liners that carry little context


def _help_topics() -> list[str]:
    """The `help("topic")` pages: the language reference, one page per keyword or concept."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _public_objects(module) -> list[tuple[str, object]]:
    """(qualified name, object) for the module, its public members defined in it and their methods."""
    found = [(module.__name__, module)]
    for name in sorted(vars(module)):
        member = vars(module)[name]
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        found.append((f"{module.__name__}.{name}", member))
        if inspect.isclass(member):
            # Methods must come from the module too: other libraries patch stdlib classes (e.g.
            # transformers adds logging.Logger.warning_once), which would make the corpus depend on
            # what the process happened to import.
            found += [(f"{module.__name__}.{name}.{attr}", value)
                      for attr, value in sorted(vars(member).items())
                      if not attr.startswith("_") and callable(value)
                      and getattr(value, "__module__", module.__name__) == module.__name__]
    return found


def _docstrings() -> list[str]:
    """Docstrings of `STDLIB_MODULES`, each headed by the object's qualified name."""
    documents = []
    # Deprecated aliases (e.g. `typing.io`) warn when touched; reading their docstring is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in STDLIB_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a Python built without an optional part (e.g. no _sqlite3)
                continue
            for qualified_name, value in _public_objects(module):
                doc = inspect.getdoc(value)
                if doc:
                    documents.append((qualified_name, doc))
    # Inherited and shared docstrings repeat; keep the first object that carries each one.
    seen, unique = set(), []
    for qualified_name, doc in documents:
        if doc not in seen:
            seen.add(doc)
            unique.append(f"{qualified_name}\n\n{doc}")
    return unique


def python_docs_corpus(min_chars: int = MIN_DOCUMENT_CHARS) -> list[str]:
    """Help topics then stdlib docstrings, de-duplicated, each at least `min_chars` long."""
    seen, corpus = set(), []
    for text in _help_topics() + _docstrings():
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            corpus.append(text)
    return corpus


def stable_unit_hash(text: str, seed: int) -> float:
    """A hash of (seed, text) in [0, 1) that is the same in every process, unlike `hash()`."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") / 2**64


def is_held_out(text: str, fraction: float = HELD_OUT_FRACTION, seed: int = 0) -> bool:
    """Whether a document is held out for eval: a function of its text and seed alone."""
    return stable_unit_hash(text, seed) < fraction


def split_documents(documents: list[str], held_out_fraction: float = HELD_OUT_FRACTION,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out), each in corpus order; a document's side depends only on its text and seed."""
    train, held_out = [], []
    for text in documents:
        (held_out if is_held_out(text, held_out_fraction, seed) else train).append(text)
    return train, held_out
