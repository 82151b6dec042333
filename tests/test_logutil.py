"""Rate-limited logging of hostile input: a flood cannot fill the disk."""

import logging

from fms import logutil
from fms.logutil import RATE_BURST, RateLimitedLog


def test_a_flood_is_cut_to_a_burst_and_the_rest_is_counted(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(logutil.time, "monotonic", lambda: now[0])
    limited = RateLimitedLog(logging.getLogger("flood"))
    with caplog.at_level(logging.WARNING, logger="flood"):
        for i in range(1000):
            limited.warning("event=bad_message n=%d", i)
        assert len(caplog.records) == RATE_BURST
        now[0] += logutil.RATE_WINDOW + 1  # the next window
        limited.warning("event=bad_message n=%d", 1000)
    messages = [r.getMessage() for r in caplog.records]
    assert f"event=log_suppressed lines={1000 - RATE_BURST}" in messages
    assert messages[-1] == "event=bad_message n=1000"
