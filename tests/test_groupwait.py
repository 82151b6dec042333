"""fms.storage.groupwait: when a storage worker's lone change waits for company, and for how
long.  Whether that pays is measured by benchmarks (docs/BENCHMARKS.md), not here."""

import threading

import pytest

from fms.storage import groupwait
from fms.storage.groupwait import CpuScarcity, GroupWait, read_schedstat


def test_a_wait_is_tried_again_only_after_waits_that_caught_nothing_are_skipped_more_and_more():
    """A wait that catches nothing (a writer that waits for each answer) skips the next 1,
    then 3, 7 ... groups; one that catches another waits again at the next group."""
    wait = GroupWait(scarce=lambda now: True)
    assert wait.seconds(0) == 0  # nothing pending
    assert 0 < wait.seconds(1) <= groupwait.WAIT
    wait.applied(1)  # a group of one: the wait caught nothing
    skipped = []
    for _ in range(1 + 3 + 7 + 3):
        skipped.append(wait.seconds(1) == 0)
        wait.applied(1)
    assert skipped == [True, False, True, True, True, False] + [True] * 7 + [False]
    for _ in range(15):  # the next 15 are skipped
        assert wait.seconds(1) == 0
        wait.applied(1)
    assert wait.seconds(1) > 0
    assert wait.seconds(2) == 0  # caught one: the largest recent group was 1 (at least 2)
    wait.applied(2)  # ... so waiting pays again
    assert wait.seconds(1) > 0
    wait.applied(1)  # a miss: skip one
    assert wait.seconds(1) == 0
    wait.applied(1)
    assert wait.seconds(1) > 0


def test_a_wait_ends_once_as_many_are_in_hand_as_the_largest_recent_group_had():
    """Writers in step wait for each other, not for one more; never past GROUP in hand."""
    wait = GroupWait(scarce=lambda now: True)
    for size in (2, 5, groupwait.GROUP + 4):
        wait.applied(size)  # a drain that found `size` at once
        waits = [wait.seconds(n) > 0 for n in range(1, size + 1)]
        most = min(size, groupwait.GROUP)
        assert waits == [True] * (most - 1) + [False] * (size - most + 1)
        wait.applied(size)
    for _ in range(groupwait.HISTORY):  # the large groups are forgotten
        wait.applied(3)
    assert [wait.seconds(n) > 0 for n in (1, 2, 3)] == [True, True, False]


def test_no_wait_while_cpus_are_not_scarce():
    scarce = [False]
    wait = GroupWait(scarce=lambda now: scarce[0])
    assert wait.seconds(1) == 0
    wait.applied(1)
    scarce[0] = True
    assert wait.seconds(1) > 0


def test_cpus_are_scarce_when_wake_ups_lately_waited_long_enough_for_one():
    """Looked at every LOOK_EVERY: scarce when the wake-ups since the last look waited
    SCARCE_WAIT or more each on average, and were at least LOOK_SLICES of them."""
    ns = 1e9
    wait = groupwait.SCARCE_WAIT * ns
    wakes = groupwait.LOOK_SLICES
    readings = iter(
        [
            (0, 0, 0),
            (0, int(wait * wakes), wakes),  # each waited SCARCE_WAIT: scarce
            (0, int(wait * wakes) + int(wait * wakes * 0.9), 2 * wakes),  # 0.9 of it: not
            (0, 10**12, 2 * wakes + wakes - 1),  # long waits, too few wake-ups: says nothing
        ]
    )
    scarcity = CpuScarcity(read=lambda: next(readings))
    every = groupwait.LOOK_EVERY
    assert scarcity(0.0) is False  # the first look: nothing to compare with
    assert scarcity(every / 2) is False  # not looked at again yet
    assert scarcity(every) is True
    assert scarcity(every * 1.5) is True  # kept between looks
    assert scarcity(2 * every) is False
    assert scarcity(3 * every) is False


def test_where_the_kernel_keeps_no_counters_cpus_are_never_scarce():
    calls = []
    scarcity = CpuScarcity(read=lambda: calls.append(1))
    assert scarcity(0.0) is False and scarcity(10.0) is False and scarcity(1e9) is False
    assert len(calls) == 1  # not asked again


@pytest.mark.skipif(read_schedstat() is None, reason="the kernel keeps no schedstat")
def test_this_machine_keeps_the_counters_of_each_thread():
    """Linux's /proc/thread-self/schedstat: the calling thread's, so the worker loop's own."""
    mine = read_schedstat()
    assert mine is not None and all(v >= 0 for v in mine)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(read_schedstat()))
    t.start()
    t.join()
    assert theirs[0] is not None and theirs[0] != mine
