"""The reference model's logits, computed once per comparison and replayed for every file.

`compare` measures N files against one reference on the same windows. Run naively, the
reference (the float model, the slowest file of all) runs N+1 times. Its logits for each window
are recorded as float32 .npy files in a temporary directory on the first pass and read back
afterwards (mostly from the page cache), so the KL divergence is the same to the bit. The
directory goes when the comparison ends, Ctrl-C and SIGTERM included (signals.py); it is one of
atomic.py's temporaries (`.npft-gguf-ref.npft-PID.ref` in the system's temporary directory,
locked while it lives), so what a SIGKILL leaves, the next comparison removes. Recording
stops, and the reference simply runs again, when it would pass its disk budget or leave the disk
nearly full: a long text on a 150k-token vocabulary is gigabytes per pass. `compare` says so
before the first pass, where it knows the record will not hold every window.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..atomic import temporary
from .models import Backend

GiB = 1 << 30
BUDGET_BYTES = 16 << 30  # recorded logits per comparison, at most
FREE_BYTES = 2 << 30  # left free on the temporary directory's disk, at least
RECORD_NAME = "npft-gguf-ref"  # the record is the temporary `.npft-gguf-ref.npft-PID.ref` (atomic.temporary)


class RecordedBackend(Backend):
    """`inner`, with its logits for each (window, first) kept after the first call."""

    def __init__(self, inner: Backend, directory: Path, budget: int = BUDGET_BYTES, free: int = FREE_BYTES):
        super().__init__(label=inner.label, n_vocab=inner.n_vocab, add_bos=inner.add_bos, bos_id=inner.bos_id,
                         n_ctx_train=inner.n_ctx_train, settings=inner.settings)
        self.inner, self.directory, self.budget, self.free = inner, Path(directory), budget, free
        self.recorded = 0  # bytes
        self.replayed = 0  # calls answered from the record
        self.computed = 0  # calls `inner` answered (its decodes)
        self._tokens: dict[str, list[int]] = {}
        self._fingerprint: dict[int, tuple] = {}

    def tokenize(self, text):
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        if key not in self._tokens:
            self._tokens[key] = self.inner.tokenize(text)
        return list(self._tokens[key])

    def vocab_fingerprint(self, n=256):
        if n not in self._fingerprint:
            self._fingerprint[n] = self.inner.vocab_fingerprint(n)
        return self._fingerprint[n]

    def logits(self, tokens, first=0):
        key = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes() + int(first).to_bytes(8, "little")).hexdigest()
        path = self.directory / f"{key}.npy"
        if path.exists():
            self.replayed += 1
            return np.load(path)
        x = self.inner.logits(tokens, first)
        self.computed += 1
        if self._room_for(x.nbytes):
            part = path.with_suffix(".part")
            with open(part, "wb") as f:
                np.save(f, np.ascontiguousarray(x, dtype=np.float32))
            os.replace(part, path)  # a half-written record is never read back
            self.recorded += x.nbytes
        return x

    def _room_for(self, nbytes: int) -> bool:
        return (self.recorded + nbytes <= self.budget
                and shutil.disk_usage(self.directory).free - nbytes >= self.free)

    def shortfall(self, nbytes: int) -> str | None:
        """Why `nbytes` more of logits cannot all be recorded (None: they can), said before a pass."""
        free = shutil.disk_usage(self.directory).free - self.free
        room = min(self.budget - self.recorded, free)
        if nbytes <= room:
            return None
        limit = (f"the record's budget of {self.budget / GiB:.1f} GiB" if self.budget - self.recorded <= free else
                 f"the {max(free, 0) / GiB:.1f} GiB free on {self.directory.parent} (keeping {self.free / GiB:.0f} GiB free)")
        return f"the reference's logits need {nbytes / GiB:.1f} GiB, past {limit}"


def logits_bytes(n_windows: int, ctx: int, n_vocab: int) -> int:
    """What recording the reference on `n_windows` windows of `ctx` takes: float32 logits of the
    scored half of each (perplexity.evaluate asks for positions ctx/2 .. ctx-1)."""
    return n_windows * (ctx - ctx // 2) * n_vocab * 4


@contextmanager
def recorded(inner: Backend, budget: int | None = None, free: int | None = None):
    """A RecordedBackend over `inner` whose record lives as long as the block (budget and free
    space: BUDGET_BYTES and FREE_BYTES as they are when it starts)."""
    with temporary(Path(tempfile.gettempdir()) / RECORD_NAME, "ref", directory=True) as d:
        yield RecordedBackend(inner, d, BUDGET_BYTES if budget is None else budget, FREE_BYTES if free is None else free)
