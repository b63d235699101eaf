"""Prefix-state cache: a state cannot be rewound, so states are stored at chosen prompt
boundaries, keyed by a hash of the token ids that led to them, bounded in bytes (LRU)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from retnet.model import RetNetState

BOUNDARY_EVERY = 256  # store a state every this many prompt tokens


def prefix_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True)
class Entry:
    state: RetNetState  # batch of one, after the prefix
    logits: torch.Tensor  # [V] next-token logits after the prefix

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * self.logits.element_size()


class PrefixCache:
    """Thread-safe LRU of prefix states, bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, ids: Sequence[int], entry: Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        key = prefix_key(ids)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes

    def longest(self, ids: Sequence[int], boundaries: Sequence[int]) -> tuple[int, Entry | None]:
        """The longest stored prefix of ids among the candidate lengths (longest first)."""
        for n in sorted(set(boundaries), reverse=True):
            if not 0 < n <= len(ids):
                continue
            key = prefix_key(ids[:n])
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return n, entry
        return 0, None


def boundaries(n_tokens: int, message_ends: Sequence[int] = ()) -> list[int]:
    """Where to store states for a prompt of n_tokens: every BOUNDARY_EVERY tokens, each
    message end, and the whole prompt."""
    points = set(range(BOUNDARY_EVERY, n_tokens + 1, BOUNDARY_EVERY)) | set(message_ends)
    points.add(n_tokens)
    return sorted(p for p in points if 0 < p <= n_tokens)


class StateStore:
    """Conversation states saved by clients (`save_state`), bounded by total bytes: the
    least recently used (saved or continued) goes first. Thread-safe: the HTTP side looks
    states up while the engine thread saves them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[str, RetNetState] = OrderedDict()
        self._bytes = 0
        self.evicted = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> RetNetState | None:
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            return state

    def put(self, key: str, state: RetNetState) -> None:
        """Keep state under key, evicting the least recently used to stay within bounds (the
        caller checks that one state fits: see `fits`)."""
        with self._lock:
            self._states[key] = state
            self._bytes += state.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._states.popitem(last=False)
                self._bytes -= old.nbytes
                self.evicted += 1

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.max_bytes
