"""The per-chat pacing: about one message a second, never more than 20 a minute to a group."""

from __future__ import annotations

from bridge.delivery import GROUP_LIMIT, Pacer

GROUP = -100123


def test_group_is_spread_out_then_capped_at_twenty_a_minute() -> None:
    pacer = Pacer(interval=1.0, group_interval=2.0)
    now = 1000.0
    for n in range(GROUP_LIMIT):
        now += pacer.delay(GROUP, now)
        pacer.sent(GROUP, now)
        if n < 9:
            assert pacer.delay(GROUP, now) == 1.0  # one a second at first
    assert pacer.delay(GROUP, now) > 2.0  # the 21st waits until the oldest is a minute old
    assert now - 1000.0 < 60.0


def test_sends_reloaded_from_the_database_are_not_counted_twice() -> None:
    """Each send is also in the database, a few milliseconds apart: loading must not double it."""
    pacer = Pacer(interval=1.0, group_interval=2.0)
    now = 1000.0
    local = []
    for _ in range(10):
        now += 1.0
        pacer.sent(GROUP, now)
        local.append(now + 0.003)  # the database's time of the same send
    pacer.load(GROUP, local)
    assert pacer.delay(GROUP, now + 3.0) == 0.0  # 10 in the minute, not 20: no cap
