"""One progress reporter for every long agent command (``memtrain answer``, ``memtrain eval ...``).

Why: a CPU evaluation can run for half an hour per document, and a command that prints nothing meanwhile
cannot be told from a hung one. The reporter counts turns (done / total, the total estimated from each
document's length and corrected to its real chunk count once it is chunked), documents, generated tokens/s
and the ETA, and logs one line at most every ``interval_s`` seconds (``MEMTRAIN_PROGRESS_INTERVAL``), plus a
last one; ``MEMTRAIN_NO_PROGRESS=1`` (set by the tests) silences it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

from memtrain.agent.types import Turn
from memtrain.log import logger

DEFAULT_INTERVAL_S = 10.0
CHARS_PER_TOKEN = 4.0  # rough English BPE ratio; only used until a document is chunked


def estimate_turns(num_chars: int, chunk_tokens: int, max_chunks: int | None) -> int:
    """Turns of one memory-agent trajectory over a document of ``num_chars`` characters (chunks + final)."""
    chunks = max(1, math.ceil(num_chars / CHARS_PER_TOKEN / chunk_tokens))
    return (chunks if max_chunks is None else min(chunks, max_chunks)) + 1


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts turns, documents and generated tokens of a run and reports rate and ETA, rate-limited."""

    def __init__(self, label: str, total_docs: int, total_turns: int, interval_s: float | None = None,
                 emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        if interval_s is None:
            interval_s = float(os.environ.get("MEMTRAIN_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.label = label
        self.total_docs = total_docs
        self.total_turns = max(total_turns, 1)
        self.interval_s = interval_s
        self.enabled = not os.environ.get("MEMTRAIN_NO_PROGRESS")
        self._emit = emit or logger.info
        self._clock = clock
        self.start = clock()
        self._last = self.start
        self.turns = self.docs = self.tokens = 0
        self._estimates: dict[int, int] = {}  # trajectory index -> estimated turns, until its first turn

    def batch(self, estimates: Sequence[int]) -> None:
        """Estimated turns of each trajectory (by index) of the next ``MemoryAgent.run`` call."""
        self._estimates = dict(enumerate(estimates))

    def on_turn(self, index: int, turn: Turn, num_chunks: int) -> None:
        """A ``MemoryAgent.run`` ``on_turn`` callback."""
        estimate = self._estimates.pop(index, None)
        if estimate is not None:  # the first turn of a trajectory: its real length is known now
            self.total_turns += num_chunks + 1 - estimate
        self.turns += 1
        self.tokens += len(turn.completion_ids)
        if turn.kind == "final":
            self.docs += 1
        self.maybe_report()

    def add(self, docs: int = 0, turns: int = 0, tokens: int = 0) -> None:
        """Work finished outside an ``on_turn`` callback (e.g. a batch of search episodes)."""
        self.docs += docs
        self.turns += turns
        self.tokens += tokens
        self.maybe_report()

    def _rates(self) -> tuple[str, str]:
        """(turns done/total, "N generated tokens/s, elapsed H:MM:SS, ETA H:MM:SS")."""
        elapsed = max(self._clock() - self.start, 1e-9)
        total = max(self.total_turns, self.turns)
        rate = self.turns / elapsed
        eta = _clock((total - self.turns) / rate) if rate > 0 else "?"
        return (f"turns {self.turns}/{total}",
                f"{self.tokens / elapsed:.1f} generated tokens/s, elapsed {_clock(elapsed)}, ETA {eta}")

    def status(self) -> str:
        turns, rates = self._rates()
        return f"{self.label}: {turns}, documents {self.docs}/{self.total_docs}, {rates}"

    def brief(self) -> str:
        """Turns, rate and ETA only, for a command that already prints one line per turn."""
        return ", ".join(self._rates())

    def maybe_report(self) -> None:
        now = self._clock()
        if self.enabled and now - self._last >= self.interval_s:
            self._last = now
            self._emit(self.status())

    def finish(self) -> None:
        if self.enabled and self.turns:
            self._emit(self.status())
