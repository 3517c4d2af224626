"""The corpus, the batches and the initial weights of ``cautious research``: NumPy only, deterministic.

Corpus. The ``.py`` sources of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``/``dist-packages``), sorted by
path relative to that directory; the first ``chunk`` bytes of each file are taken in that order
until ``total`` bytes are collected. Every ``val_every``-th file (by position in the sorted list)
goes to validation, the others to training, so no file is in both. Tokens are bytes; the
vocabulary is the sorted set of byte values seen in the corpus (``V`` tokens, ids ``0..V-1``).
Another Python version ships other sources: the report records the corpus's SHA-256.

Batches. For ``seed``, ``steps`` mini-batches of ``batch`` windows of ``context + 1`` tokens at
uniformly drawn offsets of the training stream (``numpy.random.default_rng(seed + 1)``); the model
reads ``window[:-1]`` and predicts ``window[1:]``. Validation: ``val_windows`` windows at evenly
spaced offsets of the validation stream, the same for every seed.

Initial weights (``numpy.random.default_rng(seed)``, in :func:`cautious.research.model.param_specs`
order): normal with std 0.02 for embeddings, attention and MLP matrices and the head, the two
residual projections scaled by ``1/sqrt(2 * layers)`` (GPT-2's convention), norm gains 1, biases 0.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from typing import Any

import numpy as np

from cautious.research.model import ModelConfig, param_specs

__all__ = ["Corpus", "stdlib_files", "build_corpus", "make_batches", "make_val", "init_params"]


class Corpus:
    """Token streams (``train``, ``val``: int32 arrays), the byte ``vocab`` and provenance."""

    def __init__(self, train: np.ndarray, val: np.ndarray, vocab: np.ndarray, meta: dict[str, Any]) -> None:
        self.train, self.val, self.vocab, self.meta = train, val, vocab, meta

    def decode(self, ids: np.ndarray) -> str:
        """The text of token ids (for looking at samples)."""
        return bytes(self.vocab[np.asarray(ids)].astype(np.uint8).tolist()).decode("utf-8", "replace")


def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's ``.py`` files under ``root``, as sorted relative paths."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def build_corpus(total: int = 400_000, chunk: int = 4096, val_every: int = 10, root: str | None = None) -> Corpus:
    """The deterministic byte corpus described in the module docstring."""
    if total < 2 * chunk or chunk < 1 or val_every < 2:
        raise ValueError(f"need total >= 2 * chunk, chunk >= 1 and val_every >= 2, got {total}, {chunk}, {val_every}")
    root = root or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    taken = 0
    used = 0
    for i, rel in enumerate(files):
        if taken >= total:
            break
        with open(os.path.join(root, rel), "rb") as f:
            piece = f.read(min(chunk, total - taken))
        parts["val" if i % val_every == 0 else "train"].append(piece)
        taken += len(piece)
        used += 1
    if taken < total:
        raise RuntimeError(f"the standard library under {root} has only {taken} bytes in {len(files)} files")
    train_b, val_b = b"".join(parts["train"]), b"".join(parts["val"])
    raw = np.frombuffer(train_b + val_b, dtype=np.uint8)
    vocab = np.unique(raw)
    lut = np.zeros(256, dtype=np.int32)
    lut[vocab] = np.arange(len(vocab), dtype=np.int32)
    meta = {
        "root": root,
        "files_used": used,
        "files_available": len(files),
        "bytes": taken,
        "train_bytes": len(train_b),
        "val_bytes": len(val_b),
        "vocab": int(len(vocab)),
        "sha256": hashlib.sha256(train_b + b"\0" + val_b).hexdigest(),
        "chunk": chunk,
        "val_every": val_every,
    }
    train = lut[np.frombuffer(train_b, dtype=np.uint8)]
    val = lut[np.frombuffer(val_b, dtype=np.uint8)]
    return Corpus(train, val, vocab, meta)


def make_batches(stream: np.ndarray, seed: int, steps: int, batch: int, context: int) -> np.ndarray:
    """``(steps, batch, context + 1)`` int32 windows at uniformly drawn offsets (seeded)."""
    if len(stream) <= context + 1:
        raise ValueError(f"the training stream ({len(stream)} tokens) is shorter than context + 1 = {context + 1}")
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, len(stream) - context - 1, size=(steps, batch))
    return stream[starts[..., None] + np.arange(context + 1)].astype(np.int32)


def make_val(stream: np.ndarray, windows: int, context: int) -> np.ndarray:
    """``(windows, context + 1)`` int32 windows at evenly spaced offsets of the validation stream."""
    if len(stream) <= context + 1:
        raise ValueError(f"the validation stream ({len(stream)} tokens) is shorter than context + 1 = {context + 1}")
    starts = np.linspace(0, len(stream) - context - 1, windows).astype(np.int64)
    return stream[starts[:, None] + np.arange(context + 1)].astype(np.int32)


def init_params(cfg: ModelConfig, seed: int) -> list[np.ndarray]:
    """Initial weights (float64) in :func:`param_specs` order, from ``seed`` (see module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in param_specs(cfg):
        if spec.init == "one":
            out.append(np.ones(spec.shape))
        elif spec.init == "zero":
            out.append(np.zeros(spec.shape))
        else:
            std = 0.02 / (math.sqrt(2 * cfg.layers) if spec.init == "residual" else 1.0)
            out.append(std * rng.standard_normal(spec.shape))
    return out
