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


def test_zeromq_s_io_thread_is_counted_apart_and_within_the_whole():
    """The bracketed part: the CPU of libzmq's I/O threads (named ZMQbg/IO/N), which move
    the messages between the sockets and their TCP connections."""
    import zmq

    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        (before,) = s3wake.process_stats({"me": os.getpid()}).values()
        grew = False
        for _ in range(50):  # until the I/O threads have a tick of their own (10 ms)
            for _ in range(2000):
                push.send(b"x" * 4096)
            for _ in range(2000):
                assert pull.poll(5000)
                pull.recv()
            (after,) = s3wake.process_stats({"me": os.getpid()}).values()
            if after[4] + after[5] > before[4] + before[5]:
                grew = True
                break
        assert grew
        assert after[4] + after[5] <= after[0] + after[1]  # a part of the process's CPU
        pull.close(0)
        push.close(0)
    finally:
        ctx.term()
