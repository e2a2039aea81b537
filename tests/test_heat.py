"""The server's heat warnings, from recorded readings."""

from __future__ import annotations

import asyncio
import logging

from edgeinfer.heat import HeatWatch, watch


def feed(throttling, temps):
    t, c = iter(throttling), iter(temps)
    return HeatWatch(throttling=lambda: next(t), temperature=lambda: next(c))


def pi(*now):
    return {"now": list(now), "since_boot": list(now), "source": "vcgencmd get_throttled"}


def test_a_pi_that_starts_and_stops_throttling():
    h = feed([pi(), pi("throttled", "soft temperature limit"), pi("throttled"), pi()], [62, 83, 84, 70])
    assert h.check() == []
    said = h.check()
    assert [lvl for lvl, _ in said] == [logging.WARNING, logging.WARNING]
    assert "throttled, soft temperature limit" in said[0][1] and "vcgencmd" in said[0][1]
    assert "83 °C" in said[1][1]
    assert h.check() == []            # still throttling, still hot: said once
    assert [m for _, m in h.check()] == ["the CPU no longer reports throttling", "the CPU has cooled to 70 °C"]


def test_kernel_throttle_events_on_x86():
    def x86(n):
        return {"now": [], "since_boot": [], "events": n, "source": "thermal_throttle/core_throttle_count"}

    h = feed([x86(5), x86(5), x86(9)], [None, None, None])
    assert h.check() == [] and h.check() == []   # events from before we started are not news
    (level, message), = h.check()
    assert level == logging.WARNING and "4 times" in message


def test_a_machine_that_reports_nothing_says_nothing():
    h = feed([None] * 3, [None] * 3)
    assert h.check() == h.check() == h.check() == []


def test_the_watch_logs_and_survives_a_failing_sensor(caplog):
    calls = []

    def throttling():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("sensor gone")
        return pi("under-voltage")

    async def main():
        task = asyncio.ensure_future(watch(logging.getLogger("edgeinfer.test"), every=0.01,
                                           heat=HeatWatch(throttling=throttling, temperature=lambda: None)))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="edgeinfer.test"):
        asyncio.run(main())
    assert [r.message for r in caplog.records if "under-voltage" in r.message]
