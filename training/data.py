"""The training corpus: English text that ships with CPython itself (PSF License v2).

Documents:
- every docstring (module, class, function; at least 40 characters) of the pure-Python
  standard library of the running interpreter, read with `ast` (nothing is imported),
  leaving out test suites, and
- every topic of `pydoc_data/topics.py` (the Language Reference sections that `help()` shows).

Exact duplicates are dropped, the documents are shuffled with a fixed seed, and the first
documents holding ~5% of the characters are held out for evaluation. The split depends only on
the interpreter's standard library (CPython 3.11.7 for the shipped model).

Token stream: each document is `<s> text </s>`; documents are concatenated. A training
sample is a random window of the stream (it may start mid-document); `doc_ids` tell which
document every token belongs to, so the activation locality loss never pairs two tokens
of different documents.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass

import torch

SKIP_PREFIXES = ("site-packages", "dist-packages", "test/", "idlelib/idle_test", "lib2to3/tests",
                 "tkinter/test", "unittest/test", "ctypes/test", "distutils/tests", "pydoc_data",
                 "turtledemo")
MIN_DOC_CHARS = 40
BOS_ID, EOS_ID = 1, 2  # tiny.train_tokenizer's special tokens: <unk>=0, <s>=1, </s>=2


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_docstrings(root: str) -> list[str]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel.startswith(SKIP_PREFIXES) or "/tests/" in rel or "/test/" in rel:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOC_CHARS:
                        docs.append(doc)
    return docs


def pydoc_topics(root: str) -> list[str]:
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    topics = ast.literal_eval(tree.body[-1].value)  # `topics = {...}`
    return [topics[k] for k in sorted(topics)]


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    source: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc in self.train + ["\0HELDOUT\0"] + self.heldout:
            h.update(doc.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


def load_corpus(heldout_fraction: float = 0.05, seed: int = 0, root: str | None = None) -> Corpus:
    root = root or stdlib_dir()
    seen, docs = set(), []
    for doc in pydoc_topics(root) + stdlib_docstrings(root):
        doc = doc.strip()
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    random.Random(seed).shuffle(docs)
    total = sum(map(len, docs))
    held, chars = [], 0
    while chars < heldout_fraction * total:
        doc = docs[len(held)]
        held.append(doc)
        chars += len(doc)
    return Corpus(train=docs[len(held):], heldout=held, source=root)


def encode_stream(tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, doc_ids): `<s> doc </s>` for every document, concatenated."""
    ids, doc_ids = [], []
    for i, enc in enumerate(tokenizer.encode_batch(docs, add_special_tokens=False)):
        piece = [BOS_ID] + enc.ids + [EOS_ID]
        ids.extend(piece)
        doc_ids.extend([i] * len(piece))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(doc_ids, dtype=torch.long)


class BatchSampler:
    """Random windows of seq_len + 1 tokens: inputs, next-token targets, same-document pair mask."""

    def __init__(self, ids: torch.Tensor, doc_ids: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if ids.numel() <= seq_len + 1:
            raise ValueError(f"corpus of {ids.numel()} tokens is too short for seq_len {seq_len}")
        self.ids, self.doc_ids = ids, doc_ids
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = self.seq_len
        starts = torch.randint(0, self.ids.numel() - T - 1, (self.batch_size,), generator=self.gen)
        idx = starts[:, None] + torch.arange(T + 1)
        window, docs = self.ids[idx], self.doc_ids[idx]
        same_doc = docs[:, 1:T] == docs[:, : T - 1]  # pair (t-1, t) for t = 1..T-1 of the inputs
        return window[:, :T], window[:, 1:], same_doc
