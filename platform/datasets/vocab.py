"""Id vocabularies: raw ids -> dense indices for embedding tables.

Index 0 is padding, 1 is out of vocabulary (ids never seen in the train split, e.g. a new item at
serving time), 2.. are the known ids in sorted order. Lookup is a vectorized binary search, so
the same object maps a Ray Data batch, a training batch or an HTTP request.
"""

from __future__ import annotations

import io

import numpy as np

from loopfm.datasets.schema import OOV_INDEX, PAD_INDEX
from loopfm.location import AnyPath, as_path

FIRST_INDEX = 2


class Vocab:
    def __init__(self, keys: np.ndarray):
        self.keys = np.unique(np.asarray(keys, dtype=np.int64))

    @property
    def size(self) -> int:
        """Rows an embedding table needs: known ids plus padding and OOV."""
        return len(self.keys) + FIRST_INDEX

    def lookup(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.keys) == 0:
            return np.full(ids.shape, OOV_INDEX, dtype=np.int64)
        pos = np.searchsorted(self.keys, ids)
        pos_clipped = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos_clipped] == ids
        return np.where(found, pos_clipped + FIRST_INDEX, OOV_INDEX).astype(np.int64)

    def save(self, path: AnyPath) -> None:
        """`.npy` bytes written whole (a local path or a URI's object)."""
        buffer = io.BytesIO()
        np.save(buffer, self.keys)
        as_path(path).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: AnyPath) -> Vocab:
        return cls(np.load(io.BytesIO(as_path(path).read_bytes())))


class VocabBuilder:
    """Streams batches of ids into a sorted unique set without holding every row."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._pending = 0

    def add(self, ids) -> None:
        part = np.unique(np.asarray(ids, dtype=np.int64))
        self._parts.append(part)
        self._pending += len(part)
        if self._pending > 4_000_000:
            self._parts = [np.unique(np.concatenate(self._parts))]
            self._pending = len(self._parts[0])

    def build(self) -> Vocab:
        return Vocab(np.concatenate(self._parts) if self._parts else np.empty(0, dtype=np.int64))


__all__ = ["FIRST_INDEX", "OOV_INDEX", "PAD_INDEX", "Vocab", "VocabBuilder"]
