"""A least-recently-used cache of prompt embeddings (plain numpy; no Triton imports).

Keys name the prompt *and* the encoder model version that embedded it, so a LoRA that patches
CLIP never answers from the previous CLIP's embeddings, while T5 (never touched by a LoRA) keeps
its entries across swaps. Bounded by bytes: one FLUX.1-dev T5-XXL embedding is 8 MB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np


class PromptEmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_or_compute(self, key: Hashable, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """(value, hit). A miss computes outside the lock; values are stored read-only, so a
        caller cannot change what a later hit returns."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value, True
            self.misses += 1
        value = np.array(compute(), copy=True)
        value.flags.writeable = False
        if value.nbytes <= self.max_bytes:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = value
                    self._bytes += value.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= old.nbytes
        return value, False
