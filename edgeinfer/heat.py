"""Noticing heat: the server's log says when the CPU starts throttling.

A Raspberry Pi slows its CPU at 80 to 85 °C, or when its power supply
sags, and says nothing unless asked; answers then take twice as long for
no visible reason. The server checks every half minute and logs the
change, so whoever reads the log (journalctl -u edgeinfer) learns why.
"""

from __future__ import annotations

import logging
import threading
import time

from . import hardware

HOT_C = 80.0        # where a Pi 4 or 5 starts to throttle
COOL_C = 75.0       # back below this, a hot CPU counts as cool again
CHECK_EVERY_S = 30.0


FRESH_S = 5.0       # a reading this recent is reused


class _Latest:
    """The last reading of temperature and throttling, refreshed in a
    thread of its own: a generation's stats want it as the generation
    ends, on the scheduler thread, which must never wait for a sensor
    or for vcgencmd."""

    def __init__(self):
        self.temperature: float | None = None
        self.throttled: list[str] | None = None
        self.at = 0.0
        self._busy = threading.Lock()

    def get(self) -> tuple[float | None, list[str] | None]:
        if time.monotonic() - self.at > FRESH_S and self._busy.acquire(blocking=False):
            threading.Thread(target=self._refresh, name="edgeinfer-heat", daemon=True).start()
        return self.temperature, self.throttled

    def _refresh(self) -> None:
        try:
            t = hardware.throttling()
            self.temperature = hardware.cpu_temperature()
            self.throttled = None if t is None else list(t.get("now") or [])
            self.at = time.monotonic()
        except Exception:
            self.at = time.monotonic()
        finally:
            self._busy.release()


latest = _Latest()


class HeatWatch:
    """Compares each reading with the last and says what changed, as
    ``(logging level, message)`` pairs. The readers are parameters, so
    tests feed it recorded readings."""

    def __init__(self, throttling=hardware.throttling, temperature=hardware.cpu_temperature):
        self.read_throttling, self.read_temperature = throttling, temperature
        self.throttled_now: list[str] = []
        self.events: int | None = None
        self.hot = False

    def check(self) -> list[tuple[int, str]]:
        out = []
        t = self.read_throttling()
        if t:
            now = list(t.get("now") or [])
            if now and not self.throttled_now:
                out.append((logging.WARNING, f"the CPU reports {', '.join(now)} ({t.get('source', '')}): "
                                             "answers are slower until it recovers; "
                                             "check cooling and the power supply"))
            elif self.throttled_now and not now:
                out.append((logging.INFO, "the CPU no longer reports throttling"))
            self.throttled_now = now
            events = t.get("events")
            if events is not None:
                if self.events is not None and events > self.events:
                    out.append((logging.WARNING, f"the CPU throttled itself {events - self.events} times since the "
                                                 "last check (kernel thermal events): it is running hot"))
                self.events = events
        temp = self.read_temperature()
        if temp is not None:
            if temp >= HOT_C and not self.hot:
                self.hot = True
                out.append((logging.WARNING, f"the CPU is at {temp:.0f} °C; at {HOT_C:.0f} °C and above a Pi "
                                             "throttles, and decoding slows down"))
            elif self.hot and temp < COOL_C:
                self.hot = False
                out.append((logging.INFO, f"the CPU has cooled to {temp:.0f} °C"))
        return out


async def watch(log: logging.Logger, every: float = CHECK_EVERY_S, heat: HeatWatch | None = None) -> None:
    """Log heat changes until cancelled (the readings run in a thread:
    vcgencmd is a subprocess)."""
    import asyncio

    heat = heat or HeatWatch()
    while True:
        try:
            for level, message in await asyncio.to_thread(heat.check):
                log.log(level, message)
        except Exception:   # a sensor that fails to read is no reason to stop serving
            pass
        await asyncio.sleep(every)
