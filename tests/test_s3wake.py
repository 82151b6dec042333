"""benchmarks/s3wake.py reads what it claims: a process's CPU and context switches over all its
threads, and the machine's idle ticks.  How fast fms is is measured by ``python -m
benchmarks.s3wake``, not here."""

import os
import threading

from benchmarks import s3wake


def test_a_process_s_cpu_and_switches_count_every_thread():
    (before,) = s3wake.process_stats({"me": os.getpid()}).values()
    done = threading.Event()

    def work():
        deadline = sum(range(2_000_000))  # CPU on a thread of its own
        done.wait(5)  # ... and a voluntary switch
        return deadline

    t = threading.Thread(target=work)
    t.start()
    sum(range(2_000_000))
    done.set()
    t.join()
    (after,) = s3wake.process_stats({"me": os.getpid()}).values()
    assert after[0] + after[1] > before[0] + before[1]  # user + system seconds grew
    assert after[2] >= before[2]  # voluntary switches never go down
    assert all(isinstance(v, (int, float)) and v >= 0 for v in after)


def test_the_machine_s_ticks_are_read_and_grow():
    first = s3wake.machine_ticks()
    sum(range(2_000_000))
    second = s3wake.machine_ticks()
    assert len(first) >= 5 and sum(second) > sum(first)
