"""Group commit under concurrent writers: how long a storage worker waits for company.

A storage worker applies the changes that reach it back to back in one transaction
(:mod:`fms.storage.service`).  Under many writers that is not enough on a machine whose CPUs
are all busy: each change still tends to reach the worker alone, a moment after the previous
group was answered, and pays a transaction of its own.  So a change that a drain found alone
may wait up to :data:`WAIT` for others, when three things hold:

- **CPUs are scarce.**  The worker's thread waited, on average, :data:`SCARCE_WAIT` or more for
  a CPU each time it was given one (after a wake-up, or after being preempted: Linux's
  ``/proc/thread-self/schedstat``, looked at every :data:`LOOK_EVERY`).  Then a group's saved
  work goes to someone else's request, and a wait costs only what a queue for the CPU would
  have cost anyway.  With CPUs to spare, a wait is pure latency: never then (and never where
  the kernel does not say).
- **Waiting has lately paid.**  A wait that catches nothing (one writer at a time: nothing can
  come until it is answered) is not tried again for the next 1, then 3, 7, ... up to
  :data:`SKIP_MAX` groups.
- **Fewer are in hand than recent groups had.**  The wait ends once as many changes are in hand
  as the largest of the last :data:`HISTORY` groups had (at least 2, at most :data:`GROUP`):
  writers in step wait for each other, not for one more.

Eight S3 clients' 4 KiB PUTs on two cores, in turns: groups of 1.3 changes became 2.7, and
fms's CPU per PUT fell 7 to 12 % (storage's, and the broker's and the gateway's too: replies
come in bursts); the rate stayed the same within the noise (docs/BENCHMARKS.md).
"""

import collections
import math
import time
from collections.abc import Callable

WAIT = 0.002  # seconds a group waits for company at most
GROUP = 16  # changes in hand past which a group never waits
HISTORY = 16  # groups whose sizes say how many to wait for
SKIP_MAX = 63  # groups taken without a wait, at most, after waits that caught nothing
SCARCE_WAIT = 50e-6  # seconds waited for a CPU per timeslice, on average: CPUs are scarce
LOOK_EVERY = 0.5  # seconds between looks at the scheduler's counters
LOOK_SLICES = 50  # timeslices in a look, fewer of which mean not scarce (an idle worker)

Schedstat = tuple[int, int, int]  # nanoseconds run, nanoseconds waited for a CPU, timeslices


def read_schedstat() -> Schedstat | None:
    """The calling thread's scheduler counters, or None where the kernel does not keep them."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run, wait, slices = (int(v) for v in f.read().split()[:3])
    except (OSError, ValueError):
        return None
    return run, wait, slices


class CpuScarcity:
    """Whether the calling thread has lately waited long for a CPU (see the module).

    :param read: reads the thread's counters (:func:`read_schedstat`); None from it once means
        never scarce.
    """

    def __init__(self, read: Callable[[], Schedstat | None] = read_schedstat) -> None:
        self.read = read
        self.scarce = False
        self._next = 0.0
        self._last: Schedstat | None = None

    def __call__(self, now: float) -> bool:
        if now < self._next:
            return self.scarce
        self._next = now + LOOK_EVERY
        stat = self.read()
        if stat is None:
            self._next, self.scarce = math.inf, False
            return False
        if self._last is not None:
            wait, slices = stat[1] - self._last[1], stat[2] - self._last[2]
            self.scarce = slices >= LOOK_SLICES and wait / slices >= SCARCE_WAIT * 1e9
        self._last = stat
        return self.scarce


class GroupWait:
    """One storage worker's waits for company (see the module).

    :param scarce: ``scarce(now)``: whether CPUs are scarce now (:class:`CpuScarcity`).
    """

    def __init__(self, scarce: Callable[[float], bool] | None = None) -> None:
        self.scarce = scarce if scarce is not None else CpuScarcity()
        self._until: float | None = None  # when the wait for this group ends; None: no wait
        self._from = 0  # changes in hand when it began
        self._skip = 0  # groups to take without a wait
        self._backoff = 0  # the next skip after a wait that caught nothing
        self._sizes: collections.deque[int] = collections.deque([1], HISTORY)

    def seconds(self, pending: int) -> float:
        """Seconds still to wait, with ``pending`` changes in hand (and nothing else to do)."""
        if not pending or pending >= min(max(2, *self._sizes), GROUP):
            return 0.0
        now = time.monotonic()
        if self._until is None:
            if self._skip:
                self._skip -= 1
                return 0.0
            if not self.scarce(now):
                return 0.0
            self._until, self._from = now + WAIT, pending
        return min(WAIT, max(0.0, self._until - now))  # (min: a rounding may pass WAIT)

    def applied(self, group: int) -> None:
        """A group of ``group`` changes is applied: if it waited, learn whether that paid."""
        self._sizes.append(group)
        if self._until is None:
            return
        self._until = None
        if group > self._from:
            self._backoff = 0
        else:
            self._backoff = min(2 * self._backoff + 1, SKIP_MAX)
            self._skip = self._backoff
