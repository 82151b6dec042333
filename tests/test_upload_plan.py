"""The client's upload plan: chunk digests from one read pass (two threads) and the file digest
derived from them, for every shape of file."""

import os
import threading

import pytest
from storage_helpers import h

from fms import wire as p
from fms.client.upload import HASH_AHEAD, plan_file
from fms.errors import TooLarge

CHUNK = p.MIN_CHUNK_SIZE


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, (HASH_AHEAD + 3) * CHUNK + 5, 40 * CHUNK + 1],
)
def test_plan_has_every_chunk_digest_in_order_and_the_digest_they_give(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    plan = plan_file(str(path), CHUNK, h)
    digests = [h(data[i : i + CHUNK]) for i in range(0, size, CHUNK)]
    assert plan.size == size and plan.chunks() == digests
    extents = ((CHUNK, size),) if size else ()
    pages = [h(b"".join(digests))] if digests else []  # one page: up to 65,536 chunks
    assert plan.digest == p.tree_digest(extents, pages, h) == p.inline_digest(extents, digests, h)
    assert plan.page_ids == (pages if len(digests) > p.INLINE_CHUNKS else None)
    assert plan.inline == (data if p.travels_inline(size, len(digests)) else None)


def test_a_file_over_the_manifest_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.img"
    with open(path, "wb") as f:
        f.truncate((p.MAX_FILE_CHUNKS + 1) * CHUNK)  # sparse: nothing to read, much to refuse
    with pytest.raises(TooLarge, match="larger chunks"):
        plan_file(str(path), CHUNK, h)


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_a_file_longer_than_its_size_said_is_read_whole(tmp_path, size):
    """A file of less than a chunk is read into a buffer of its size and a byte: one that grew
    since (here a FIFO, whose size reads 0) is read on, to its end, in chunks."""
    data = os.urandom(size)
    fifo = tmp_path / "grows"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    plan = plan_file(str(fifo), CHUNK, h)
    writer.join(10)
    assert not writer.is_alive()
    assert plan.size == size
    assert plan.chunks() == [h(data[i : i + CHUNK]) for i in range(0, size, CHUNK)]
    assert plan.inline == (data if p.travels_inline(size, plan.count) else None)
