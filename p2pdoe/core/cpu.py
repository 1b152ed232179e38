"""CPU time, measured for the figures of reports and results.json and never decided on: the clocks a
service hands its machines, and the parts of a participant's CPU time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _no_cpu() -> float:
    return 0.0


@dataclass(frozen=True)
class CpuClocks:
    """The process's CPU time, and the calling thread's (a step's share, whichever thread runs it)."""

    process: Callable[[], float] = _no_cpu
    thread: Callable[[], float] = _no_cpu


NO_CPU = CpuClocks()  # nothing measured


@dataclass
class CpuParts:
    """CPU seconds, each in the thread that spent them: the participant's steps (its solves and
    coupling updates) and the agreement messages' decoding and encoding. Running totals."""

    steps_s: float = 0.0
    codec_s: float = 0.0

    def since(self, earlier: CpuParts) -> CpuParts:
        return CpuParts(self.steps_s - earlier.steps_s, self.codec_s - earlier.codec_s)
