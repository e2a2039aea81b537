"""Progress for long transfers: a bar on a terminal, plain periodic lines
otherwise (logs, CI, pipes), nothing with ``quiet``."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    """start() on an active reporter only updates its total, so a retried
    transfer keeps one bar."""

    def start(self, total: int | None, desc: str, initial: int = 0, unit: str = "B") -> None: ...
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def start(self, total, desc, initial=0, unit="B"): pass
    def update(self, n): pass
    def close(self): pass


def human_bytes(n: float) -> str:
    """1000-based sizes, as people read them: 98.4 MB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class LineProgress:
    """One line every ``every`` seconds: done/total, rate, ETA."""

    def __init__(self, stream: TextIO | None = None, every: float = 2.0):
        self.stream = stream or sys.stderr
        self.every = every
        self.active = False

    def start(self, total, desc, initial=0, unit="B"):
        if self.active:
            self.total = total or self.total
            return
        self.total, self.desc, self.done, self.unit = total, desc, initial, unit
        self.t0 = self.last = time.monotonic()
        self.base = initial
        self.active = True
        print(f"{desc}: starting" + (f" at {self._fmt(initial)}" if initial else ""), file=self.stream, flush=True)

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else f"{n:.0f} {self.unit}"

    def update(self, n):
        if not self.active:
            return
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now):
        rate = (self.done - self.base) / max(now - self.t0, 1e-6)
        text = f"{self.desc}: {self._fmt(self.done)}"
        if self.total:
            text += f" / {self._fmt(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {self._fmt(rate) if self.unit == 'B' else f'{rate:.1f} {self.unit}'}/s"
        if self.total and rate > 0:
            text += f", ETA {max(self.total - self.done, 0) / rate:.0f}s"
        print(text, file=self.stream, flush=True)

    def close(self):
        if self.active:
            self.active = False
            self._line(time.monotonic())


class BarProgress:
    """A tqdm byte bar (size, rate, ETA) for terminals."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.bar = None

    def start(self, total, desc, initial=0, unit="B"):
        from tqdm import tqdm

        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
                self.bar.refresh()
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B",
                        unit_divisor=1000, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_progress(quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """The right reporter for where output goes."""
    if quiet:
        return NullProgress()
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return BarProgress(stream)
    return LineProgress(stream)
