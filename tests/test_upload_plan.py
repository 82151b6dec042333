"""The client's upload plan: chunk digests and the whole-file sha256 from one read pass (two
threads), for every shape of file."""

import hashlib
import os

import pytest

from fms import wire as p
from fms.client.upload import HASH_AHEAD, plan_file

CHUNK = p.MIN_CHUNK_SIZE


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, (HASH_AHEAD + 3) * CHUNK + 5]
)
def test_plan_has_every_chunk_digest_in_order_and_the_whole_sha256(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    plan = plan_file(str(path), CHUNK)
    assert plan.size == size and plan.sha256 == hashlib.sha256(data).digest()
    assert plan.chunks == [p.sha256(data[i : i + CHUNK]) for i in range(0, size, CHUNK)]
    assert plan.inline == (data if p.travels_inline(size, len(plan.chunks)) else None)
