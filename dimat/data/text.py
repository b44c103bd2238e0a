"""A character-level language-modelling task that needs no download.

The corpus is the docstrings of a fixed list of Python standard-library modules, read from the
interpreter's own source files with :mod:`ast` (nothing is imported or fetched): one *document* per
module (its docstring and those of its public classes and functions, in source order). Text is
lower-cased onto a fixed 70-character vocabulary (printable ASCII without capitals; anything else
becomes ``?``), so the classes are the same whatever the corpus holds.

A sample is a window of ``context`` characters (as float ids, since dimat's loaders hold floats);
its label is the next character: next-character prediction as classification, which is what
:class:`dimat.peer.Peer` trains and evaluates. The last ``test_fraction`` of every document is held
out. ``bundle.groups`` gives each training window's document: ``partition(..., scheme="document",
groups=bundle.groups)`` hands whole documents to peers (label-free non-IID). Training windows are
stored document by document, so ``scheme="contiguous"`` (which needs only the labels, as the
federation passes them) also gives each peer a run of whole documents, sharing at most the
documents at the cut points.

The text depends on the Python version's standard library (the same on every machine running the
same version); ``source="generated"`` gives a seeded synthetic corpus that does not.
"""
from __future__ import annotations

import ast
import functools
import string
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import DatasetBundle, make_bundle, register_dataset

__all__ = ["VOCAB", "encode", "decode", "stdlib_documents", "generated_documents", "load_text"]

VOCAB = "".join(sorted(set(string.printable) - set(string.ascii_uppercase) - set("\t\r\x0b\x0c")))
_INDEX = {c: i for i, c in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]

MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections/__init__", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "html/__init__", "inspect", "ipaddress", "json/__init__", "json/decoder",
    "logging/__init__", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "shutil",
    "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest/case", "urllib/parse", "uuid", "warnings", "zipfile", "shlex", "fnmatch", "locale",
)


def encode(text: str) -> np.ndarray:
    return np.fromiter((_INDEX.get(c, _UNKNOWN) for c in text.lower().replace("\t", " ")), dtype=np.int64)


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def _docstrings(source: str) -> str:
    tree = ast.parse(source)
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"{node.name}: {doc}")
    return "\n\n".join(p for p in parts if p)


@functools.lru_cache(maxsize=4)
def stdlib_documents(modules: Sequence[str] = MODULES) -> list[tuple[str, str]]:
    """``(module, text)`` for every listed module whose source the interpreter ships (read once per process)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for m in modules:
        path = root / f"{m}.py"
        if path.is_file():
            text = _docstrings(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                docs.append((m.replace("/__init__", "").replace("/", "."), text))
    if not docs:
        raise FileNotFoundError(f"no standard-library sources under {root}; use source='generated'")
    return docs


def generated_documents(num_docs: int = 24, chars_per_doc: int = 6000, seed: int = 0) -> list[tuple[str, str]]:
    """Seeded synthetic documents: each draws sentences from its own topic words plus shared ones."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))

    def word(n: int) -> str:
        return "".join(rng.choice(letters, size=n))
    common = [word(int(rng.integers(1, 4))) for _ in range(40)]
    docs = []
    for d in range(num_docs):
        topic = [word(int(rng.integers(3, 9))) for _ in range(30)]
        out: list[str] = []
        size = 0
        while size < chars_per_doc:
            n = int(rng.integers(4, 12))
            words = [topic[int(rng.integers(len(topic)))] if rng.random() < 0.5 else common[int(rng.integers(len(common)))]
                     for _ in range(n)]
            sentence = " ".join(words) + (". " if rng.random() < 0.8 else ".\n")
            out.append(sentence)
            size += len(sentence)
        docs.append((f"doc{d}", "".join(out)))
    return docs


def _windows(ids: np.ndarray, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, len(ids) - context, stride)
    if len(starts) == 0:
        return np.empty((0, context), np.int64), np.empty(0, np.int64)
    x = np.stack([ids[s:s + context] for s in starts])
    return x, ids[starts + context]


@register_dataset("text")
def load_text(root: str | Path | None = None, source: str = "stdlib", context: int = 32, stride: int = 4,
              test_fraction: float = 0.15, max_docs: int | None = None, seed: int = 0) -> DatasetBundle:
    """Next-character windows over an offline corpus (see the module docstring)."""
    if source == "stdlib":
        docs = list(stdlib_documents())
    elif source == "generated":
        docs = generated_documents(seed=seed)
    else:
        raise ValueError(f"text: unknown source {source!r}; choose 'stdlib' or 'generated'")
    if max_docs is not None:
        docs = docs[: int(max_docs)]
    if int(context) < 1 or int(stride) < 1:
        raise ValueError(f"text: context and stride must be positive, got {context} and {stride}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"text: test_fraction must be in (0, 1), got {test_fraction}")
    xs, ys, gs, xts, yts = [], [], [], [], []
    for d, (_, text) in enumerate(docs):
        ids = encode(text)
        cut = int(len(ids) * (1.0 - float(test_fraction)))
        x, y = _windows(ids[:cut], int(context), int(stride))
        xt, yt = _windows(ids[cut:], int(context), int(stride))
        if len(y) == 0:
            continue
        xs.append(x), ys.append(y), gs.append(np.full(len(y), d, np.int64))
        xts.append(xt), yts.append(yt)
    if not xs:
        raise ValueError(f"text: no document is longer than the context ({context} characters)")
    bundle = make_bundle("text", np.concatenate(xs), np.concatenate(ys), np.concatenate(xts),
                         np.concatenate(yts), num_classes=len(VOCAB))
    bundle.groups = np.concatenate(gs)
    bundle.documents = [name for name, _ in docs]
    return bundle
