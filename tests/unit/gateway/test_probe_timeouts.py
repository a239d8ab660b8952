"""gateway/static.py, gateway/looplag.py: which health-check timeouts are held against a replica."""

import asyncio
import time

from modelfleet.gateway.looplag import LoopLag
from modelfleet.gateway.static import timeout_excuse


def test_a_timeout_counts_unless_the_replica_streamed_to_us_or_our_loop_lagged():
    started = 100.0
    assert timeout_excuse(last_read=0.0, started=started, lag=0.01, timeout=2.0) is None
    assert timeout_excuse(last_read=99.9, started=started, lag=0.4, timeout=2.0) is None  # read before the probe
    assert timeout_excuse(last_read=100.5, started=started, lag=0.0, timeout=2.0) == "it is streaming answers"
    assert timeout_excuse(last_read=0.0, started=started, lag=0.5, timeout=2.0) == (
        "the gateway's event loop lagged 0.50s")


def test_loop_lag_sees_a_stall_even_before_its_sleep_has_ended():
    async def scenario():
        lag = LoopLag(interval=0.01)
        lag.start()
        await asyncio.sleep(0)  # its first sleep is under way
        before = time.monotonic()
        time.sleep(0.3)  # a callback that holds the loop
        ongoing = lag.worst_since(before)  # what a probe timing out right now would read
        await asyncio.sleep(0.05)
        recorded = lag.worst_since(before)
        later = time.monotonic()
        await asyncio.sleep(0.05)
        lag.stop()
        return ongoing, recorded, lag.worst_since(later)

    ongoing, recorded, since_later = asyncio.run(scenario())
    assert ongoing >= 0.25 and recorded >= 0.25
    assert since_later < 0.25  # a stall is held against the probes that lived through it only
