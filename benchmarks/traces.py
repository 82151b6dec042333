"""The issue-16 traces, reproduced by a seeded generator.

2,000 files, most 4-64 KiB, some (one in ten) from 64 KiB up to 8 MiB (log-uniform), about
420 MiB in all; 20,000 GETs with Zipf popularity over a random order of the files (so size and
popularity are independent); and a one-time scan of 3,000 cold files drawn from the same sizes.
"""

import bisect
import itertools
import random
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
FILES = 2_000
GETS = 20_000
SCAN_FILES = 3_000
CACHE_BYTES = 64 * MiB
CHUNK = 1 * MiB
ALPHAS = (0.7, 0.9, 1.1)
SEED = 5  # its files weigh 411 MiB and its scan 623 MiB, near the 420 and 568
LARGE_SHARE = 0.10  # files from 64 KiB to 8 MiB
SMALL = (4 * KiB, 64 * KiB)
LARGE = (64 * KiB, 8 * MiB)


@dataclass
class Trace:
    sizes: list  # file id -> bytes (the scan's files follow the popular ones)
    gets: list  # file ids, in order
    scan_at: int | None  # index in gets where the scan starts, or None
    scan_len: int = 0


def file_size(rng: random.Random) -> int:
    if rng.random() < LARGE_SHARE:
        lo, hi = LARGE
        return int(lo * (hi / lo) ** rng.random())
    return rng.randint(*SMALL)


def zipf_gets(rng: random.Random, files: int, count: int, alpha: float) -> list:
    """``count`` file ids drawn with Zipf(``alpha``) popularity over a shuffled order."""
    order = list(range(files))
    rng.shuffle(order)
    cum = list(itertools.accumulate(1 / (rank + 1) ** alpha for rank in range(files)))
    total = cum[-1]
    return [order[bisect.bisect_left(cum, rng.random() * total)] for _ in range(count)]


def zipf_trace(alpha: float, seed: int = SEED, files: int = FILES, gets: int = GETS) -> Trace:
    sizes_rng = random.Random(f"{seed}-sizes")  # the same files for every alpha
    sizes = [file_size(sizes_rng) for _ in range(files)]
    return Trace(sizes, zipf_gets(random.Random(f"{seed}-{alpha}"), files, gets, alpha), None)


def scan_trace(
    alpha: float = 0.9,
    seed: int = SEED,
    files: int = FILES,
    gets: int = GETS,
    scan: int = SCAN_FILES,
    after: int = 1_000,
) -> Trace:
    """``gets`` Zipf GETs, one pass over ``scan`` cold files, then ``after`` more Zipf GETs."""
    base = zipf_trace(alpha, seed, files, gets + after)
    rng = random.Random(f"{seed}-scan")
    sizes = base.sizes + [file_size(rng) for _ in range(scan)]
    gets_ = base.gets[:gets] + list(range(files, files + scan)) + base.gets[gets:]
    return Trace(sizes, gets_, gets, scan)


def chunks_of(size: int, chunk: int = CHUNK) -> list:
    """Chunk sizes of a file (one empty chunk for an empty file, as fms stores it)."""
    full, rest = divmod(size, chunk)
    return [chunk] * full + ([rest] if rest or not full else [])
