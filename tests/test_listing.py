"""The client's view of a chunk list (fms.client.listing) as a plain object: checked against the
file digest before anything is fetched, read a page at a time, each page checked against its
id, holes known from their digest."""

import os

import pytest
from storage_helpers import h, manifest_of

from fms import wire as p
from fms.client.listing import ChunkList
from fms.errors import IntegrityError


def pages_of(digests: list, extents) -> dict:
    """page id -> its bytes, as storage holds them."""
    blobs = [p.join_digests(page) for page in p.pages_of(extents, digests)]
    return {h(blob): blob for blob in blobs}


def test_a_short_list_is_checked_against_the_digest_it_gives():
    data = os.urandom(6 * 4096 + 100)
    manifest = manifest_of("f", data, chunk_size=4096)
    listing = ChunkList(manifest, None)  # nothing to fetch
    items = list(listing.items())
    assert [i for i, *_ in items] == list(range(7))
    assert b"".join(data[o : o + n] for _i, o, n, _d, _z in items) == data
    assert all(d == h(data[o : o + n]) for _i, o, n, d, _z in items)
    forged = {**manifest, "chunks": [manifest["chunks"][1], *manifest["chunks"][1:]]}
    with pytest.raises(IntegrityError, match="does not give its digest"):
        ChunkList(forged, None)


def test_a_paged_list_is_read_a_page_at_a_time_and_each_page_checked():
    count = p.PAGE_CHUNKS + 3  # two pages
    digests = [h(b"%d" % (i % 5)) for i in range(count)]
    extents = ((4096, 4096 * count),)
    store = pages_of(digests, extents)
    manifest = manifest_of("f", chunk_size=4096, size=4096 * count, digests=digests)
    fetched = []

    def fetch(ident, fresh=False):
        fetched.append((ident, fresh))
        return store[ident]

    listing = ChunkList(manifest, fetch)
    assert fetched == []  # the pages' ids came with the manifest
    assert listing.chunk(count - 1)[2] == digests[-1]
    assert [fresh for _i, fresh in fetched] == [False]  # only the page that holds it
    assert [d for _i, _o, _n, d, _z in listing.items()] == digests
    assert listing.index_at(4096 * p.PAGE_CHUNKS + 5) == p.PAGE_CHUNKS

    damaged = dict.fromkeys(store, h(b"not it") * 3)
    tries = []

    def damaged_then_whole(ident, fresh=False):
        tries.append(fresh)
        return store[ident] if fresh else damaged[ident]  # the cache's copy is bad

    assert ChunkList(manifest, damaged_then_whole).chunk(0)[2] == digests[0]
    assert tries == [False, True]  # asked again from storage
    with pytest.raises(IntegrityError, match="also from storage"):
        ChunkList(manifest, lambda ident, fresh=False: damaged[ident]).chunk(0)


def test_a_body_too_large_for_the_manifest_is_fetched_and_checked():
    extents = tuple((4096, 4096 * 2) for _ in range(40))  # 40 extents of two chunks each
    digests = [h(b"%d" % i) for i in range(80)]
    store = pages_of(digests, extents)
    page_ids = p.page_ids(extents, p.join_digests(digests), h)
    body = p.pack_body(extents, page_ids)
    assert len(body) > 1024  # more than a manifest carries
    manifest = {**manifest_of("f", chunk_size=4096, size=80 * 4096, digests=digests[:80])}
    for key in ("extents", "pages", "chunks"):
        manifest.pop(key, None)
    manifest.update(body=h(body), digest=h(body), count=80)
    store[h(body)] = body
    listing = ChunkList(manifest, lambda ident, fresh=False: store[ident])
    assert listing.extents == extents
    assert [d for *_x, d, _z in listing.items()] == digests
    assert listing.chunk(3)[:2] == (3 * 4096, 4096)


def test_chunks_of_zeros_are_known_from_their_digest():
    zero, data = h(bytes(4096)), h(b"x")
    digests = [zero, data, zero, h(bytes(100))]  # a short chunk of zeros is fetched
    manifest = manifest_of("f", chunk_size=4096, size=3 * 4096 + 100, digests=digests)
    assert [z for *_x, z in ChunkList(manifest, None).items()] == [True, False, True, False]
