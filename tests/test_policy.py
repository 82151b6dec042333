"""Who may do what: fms.policy's decisions, and a table of every op for every role run through
the storage service itself (no process, no socket: the route frame carries the key the broker
would have authenticated)."""

import os
import shutil

import pytest
import zmq
from storage_helpers import commit_fields as helper_commit_fields
from storage_helpers import h, page_blobs, split

from fms import policy
from fms import wire as p
from fms.errors import FmsError, Forbidden
from fms.policy import ADMIN, READ, WRITE, Grant, Identity, Policy
from fms.storage.engine import open_local
from fms.storage.service import StorageService

# --- the module on its own ---


def test_prefixes_match_at_folder_boundaries():
    grant = Grant(READ, "album/")  # the trailing '/' is the same grant
    assert grant.prefix == "album"
    assert grant.allows(READ, "album") and grant.allows(READ, "album/a/b.jpg")
    assert not grant.allows(READ, "albumX") and not grant.allows(READ, "albumX/a")
    assert not grant.allows(READ, "alb") and not grant.allows(WRITE, "album/a")
    assert Grant(READ, "").allows(READ, "anything/at/all")


def test_roles_nest_read_write_admin():
    for role, allowed in ((READ, {READ}), (WRITE, {READ, WRITE}), (ADMIN, {READ, WRITE, ADMIN})):
        who = Identity("x", [Grant(role, "t")])
        assert {r for r in policy.ROLES if who.may(r, "t/f")} == allowed
        assert not any(who.may(r, "u/f") for r in policy.ROLES)


def test_every_op_of_the_protocol_has_a_rule():
    assert set(p.OP_SERVICE) <= set(policy.OP_ROLE)


def test_a_refusal_names_the_op_the_name_and_the_grants():
    bob = Identity("bob", [Grant(WRITE, "bob"), Grant(READ, "shared")])
    with pytest.raises(Forbidden) as refused:
        policy.check(bob, "rm", "alice/report.pdf")
    text = str(refused.value)
    assert "'bob' may not rm 'alice/report.pdf'" in text and "write role" in text
    assert "write on 'bob', read on 'shared'" in text
    assert refused.value.code == "forbidden"
    with pytest.raises(Forbidden, match="may not rm -r under 'a/'"):
        policy.check_folder(bob, "rm_prefix", "a")
    policy.check_folder(bob, "rm_prefix", "bob/old/")
    with pytest.raises(Forbidden, match="needs the admin role on the whole store"):
        policy.check_op(bob, "gc")
    policy.check_op(bob, "have")  # write somewhere
    with pytest.raises(Forbidden, match="uploads need a write grant"):
        policy.check_op(Identity("r", [Grant(READ, "")]), "have")


def test_scans_are_the_disjoint_readable_ranges_under_a_prefix():
    who = Identity(
        "bob",
        [
            Grant(READ, "shared"),
            Grant(WRITE, "bob"),
            Grant(READ, "shared/deep"),
            Grant(READ, "b-x"),
        ],
    )
    assert policy.scans(who, READ, "") == [
        ("name", "b-x"),
        ("prefix", "b-x/"),
        ("name", "bob"),
        ("prefix", "bob/"),
        ("name", "shared"),
        ("prefix", "shared/"),
    ]
    assert policy.scans(who, WRITE, "") == [("name", "bob"), ("prefix", "bob/")]
    assert policy.scans(who, READ, "shared/deep/x") == [("prefix", "shared/deep/x")]
    assert policy.scans(who, READ, "bo") == [("name", "bob"), ("prefix", "bob/")]
    assert policy.scans(who, READ, "alice/") == []
    assert policy.scans(Identity("a", [Grant(ADMIN, "")]), READ, "x") is None
    assert policy.scans(policy.LOCAL, READ, "") is None


def test_resolve_trusts_only_the_authenticated_key():
    snap = Policy(
        3, [("bob", ["B" * 40], [Grant(WRITE, "bob")], False), ("gw", ["G" * 40], [], True)]
    )
    assert snap.resolve(None) is policy.LOCAL
    assert snap.resolve("B" * 40).name == "bob"
    assert snap.resolve("X" * 40) is policy.UNKNOWN
    assert snap.resolve("X" * 40, allow_dir=True) is policy.ALLOW_DIR
    with pytest.raises(Forbidden, match="may not act for another identity"):
        snap.resolve("B" * 40, acting_as="gw")
    assert snap.resolve("G" * 40, acting_as="bob").name == "bob"  # a gateway may
    with pytest.raises(Forbidden, match="no identity"):
        snap.resolve("G" * 40, acting_as="nobody")
    again = Policy.from_wire(snap.to_wire())
    assert again.epoch == 3 and again.resolve("B" * 40).grants == (Grant(WRITE, "bob"),)
    assert again.by_name["gw"].gateway


# --- every op, every role, through the storage service ---

KEYS = {
    "nobody": "N" * 40,
    "reader": "R" * 40,
    "writer": "W" * 40,
    "padmin": "P" * 40,
    "sadmin": "S" * 40,
    "gateway": "G" * 40,
    "mixed": "M" * 40,
}
GRANTS = {
    "reader": [(READ, "team")],
    "writer": [(WRITE, "team")],
    "padmin": [(ADMIN, "team")],
    "sadmin": [(ADMIN, "")],
    "mixed": [(WRITE, "team"), (READ, "other")],
}
SMALL = b"small file"
OTHER = b"other content"
ORDER = ["nobody", "reader", "writer", "padmin", "sadmin"]  # each may do what those before may


class Link:
    def __init__(self):
        self.replies = []
        self.routes = []  # what each reply tells the broker beside the header

    def reply(self, route, header, data=None, invalidate=None, **route_fields):
        self.replies.append(header)
        self.routes.append({"invalidate": invalidate, **route_fields})


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store holding team/a and other/x (two versions each), team/b and teamX/y, and the
    identities."""
    path = str(tmp_path_factory.mktemp("store"))
    store = open_local(path, keep_versions=2)
    service = StorageService(store, Link())
    for name, content in (
        ("team/a", b"first"),
        ("team/a", SMALL),
        ("team/b", b"b"),
        ("teamX/y", b"y"),
        ("other/x", b"old other"),
        ("other/x", OTHER),
    ):
        ask(service, None, "commit", data=p.pack_data(content), **commit_fields(name, content))
    meta = store.meta
    for name, key in KEYS.items():
        meta.add_identity(name, 0.0, "test", gateway=name == "gateway")
        meta.add_credential(name, "curve", key, 0.0, "test")
        for role, prefix in GRANTS.get(name, []):
            meta.set_grant(name, role, prefix, 0.0, "test")
    service.close()
    return path


def commit_fields(name, content) -> dict:
    """A one-chunk commit (the content sent inline with it), in 1 MiB chunks."""
    fields = helper_commit_fields(name, content, os.urandom(8).hex(), p.DEFAULT_CHUNK_SIZE, 1.0)
    del fields["op"]
    return fields


def ask(service, key, op, data=None, **fields) -> dict:
    """One request as the broker would route it from ``key`` (None: no CURVE)."""
    route = {"t": "req", "k": 1} if key is None else {"t": "req", "k": 1, "u": key}
    header = {"v": p.PROTOCOL_VERSION, "op": op, "id": 7, **fields}
    before = len(service.link.replies)
    try:
        service.handle_request(route, header, zmq.Frame(data) if data is not None else None)
        service.flush()
    except FmsError as exc:  # what fms.worker answers
        extra = exc.reply_fields() if hasattr(exc, "reply_fields") else {}
        return {
            "ok": False,
            "error": getattr(exc, "code", "internal"),
            "message": str(exc),
            **extra,
        }
    [reply] = service.link.replies[before:]
    return reply


@pytest.fixture
def fresh(template, tmp_path):
    """A copy of the template store, and its service."""
    path = str(tmp_path / "store")
    shutil.copytree(template, path)
    service = StorageService(open_local(path, keep_versions=2), Link())
    yield service
    service.close()


def cases(t):
    """(op, fields, data, least role that may) for target folder ``t`` ('team' or 'other')."""
    digest = h(SMALL if t == "team" else OTHER)
    src = "a" if t == "team" else "x"
    return [
        ("get", {"name": f"{t}/{src}"}, None, READ),
        ("stat", {"name": f"{t}/{src}"}, None, READ),
        ("versions", {"name": f"{t}/{src}"}, None, READ),
        ("get_version", {"name": f"{t}/{src}", "version": 1}, None, READ),
        ("chunk", {"hash": digest, "name": f"{t}/{src}"}, None, READ),
        ("commit", commit_fields(f"{t}/new", b"new"), p.pack_data(b"new"), WRITE),
        ("rm", {"name": f"{t}/{src}", "commit": "r1"}, None, WRITE),
        ("rm_prefix", {"prefix": t}, None, WRITE),
        ("mv", {"src": f"{t}/{src}", "name": f"{t}/moved", "commit": "m1"}, None, WRITE),
        ("cp", {"src": f"{t}/{src}", "name": f"{t}/copied", "commit": "c1"}, None, WRITE),
        ("restore", {"name": f"{t}/{src}", "commit": "s1"}, None, WRITE),
        ("purge", {"name": f"{t}/{src}", "all": True}, None, ADMIN),
    ]


STORE_OPS = [
    ("gc", {"grace": 3600}),
    ("fsck", {}),
    ("audit", {}),
    ("id_ls", {}),
    ("id_add", {"name": "carol"}),
    ("id_rm", {"name": "nobody"}),
    ("id_key", {"name": "nobody", "s3": True}),
    ("grant", {"name": "nobody", "role": "read", "prefix": "x"}),
    ("revoke", {"name": "reader", "prefix": "team"}),
]


@pytest.mark.parametrize("target", ["team", "other"])
@pytest.mark.parametrize("case", range(12))
def test_each_role_may_do_exactly_what_its_grants_allow(template, tmp_path, target, case):
    op, fields, data, least = cases(target)[case]
    for who in [*ORDER, "unknown", "gateway"]:
        path = str(tmp_path / f"{who}")
        shutil.copytree(template, path)
        service = StorageService(open_local(path, keep_versions=2), Link())
        try:
            reply = ask(service, KEYS.get(who, "U" * 40), op, data, **fields)
        finally:
            service.close()
        if who in ("unknown", "gateway", "nobody"):
            allowed = False
        elif target == "other":
            allowed = who == "sadmin"
        else:
            allowed = ORDER.index(who) >= ORDER.index(
                {READ: "reader", WRITE: "writer", ADMIN: "padmin"}[least]
            )
        if allowed:
            assert reply["ok"], f"{who} {op} {target}: {reply}"
        else:
            assert reply == {**reply, "ok": False, "error": "forbidden"}, f"{who} {op} {target}"
            assert f"may not {policy.shown_op(op)} " in reply["message"]


@pytest.mark.parametrize("op,fields", STORE_OPS)
def test_only_a_store_admin_may_run_the_store_s_own_ops(fresh, template, tmp_path, op, fields):
    for who in ["nobody", "reader", "writer", "padmin", "gateway", "unknown"]:
        reply = ask(fresh, KEYS.get(who, "U" * 40), op, **fields)
        assert reply["error"] == "forbidden", f"{who} {op}: {reply}"
        assert "admin role on the whole store" in reply["message"]
    assert ask(fresh, KEYS["sadmin"], op, **fields)["ok"]


def test_uploads_need_a_write_grant_somewhere(fresh):
    chunk = b"some chunk"
    for who, allowed in (("nobody", False), ("reader", False), ("writer", True), ("sadmin", True)):
        have = ask(fresh, KEYS[who], "have", hashes=[h(chunk)])
        put = ask(fresh, KEYS[who], "put_chunk", p.pack_data(chunk), hash=h(chunk))
        assert have["ok"] is allowed and put["ok"] is allowed, who
        if not allowed:
            assert have["error"] == put["error"] == "forbidden"


def commit_files(fresh, key, files: dict, commit: str) -> dict:
    """One ``commit_many`` of ``files`` ({name: content}) as ``key``, the commit ids
    ``commit`` + 1, 2, ...: its reply."""
    return ask(
        fresh,
        key,
        "commit_many",
        p.pack_data(b"".join(files.values())),
        names=list(files),
        sizes=[len(d) for d in files.values()],
        hashes=[h(d) for d in files.values()],
        mtimes=[1.0] * len(files),
        commits=[f"{commit}{i}" for i in range(1, len(files) + 1)],
        chunk_size=p.DEFAULT_CHUNK_SIZE,
    )


def test_batches_are_decided_per_name(fresh):
    reply = ask(fresh, KEYS["reader"], "get_many", names=["team/a", "other/x", "teamX/y"])
    assert reply["ok"]
    assert [r.get("error") for r in reply["results"]] == [None, "forbidden", "forbidden"]
    reply = commit_files(fresh, KEYS["writer"], {"team/n1": b"n1", "other/n2": b"n2"}, "x")
    assert [r["ok"] for r in reply["results"]] == [True, False]
    assert reply["results"][1]["error"] == "forbidden"
    assert ask(fresh, None, "stat", name="other/n2")["error"] == "not_found"


def test_a_commit_manys_fills_skip_a_file_refused_in_the_middle_at_the_right_offsets(fresh):
    """The cache is offered each file made (its offset in the data counts the refused one's
    bytes), never the refused one."""
    files = {"team/n1": b"n1", "other/n2": b"refused", "team/n3": b"n3!"}
    reply = commit_files(fresh, KEYS["writer"], files, "y")
    assert [r["ok"] for r in reply["results"]] == [True, False, True]
    told = fresh.link.routes[-1]
    assert told["invalidate"] == ["team/n1", "team/n3"]
    data = b"".join(files.values())
    for name, (offset, manifest) in zip(told["invalidate"], told["fills"], strict=True):
        manifest = p.decode(manifest)
        assert manifest["name"] == name and manifest["size"] == len(files[name])
        assert data[offset : offset + manifest["size"]] == files[name]


def test_mv_and_cp_are_decided_on_the_source_and_the_destination(fresh):
    """mv needs write on both names, cp read on the source and write on the destination."""
    mixed = KEYS["mixed"]  # write on team, read on other
    for op, src, dst, allowed in (
        ("cp", "other/x", "team/from-other", True),  # read there, write here
        ("mv", "other/x", "team/from-other", False),  # the source would go: write needed
        ("cp", "team/a", "other/copy", False),  # no write on the destination
        ("mv", "team/a", "other/moved", False),
        ("cp", "teamX/y", "team/y", False),  # no read on the source
        ("mv", "team/b", "team/b2", True),
    ):
        reply = ask(fresh, mixed, op, src=src, name=dst, commit=f"{op}-{src}-{dst}")
        assert reply["ok"] is allowed, (op, src, dst, reply)
        if not allowed:
            assert reply["error"] == "forbidden" and f"'mixed' may not {op} " in reply["message"]
    names = [e["name"] for e in ask(fresh, None, "ls", prefix="")["entries"]]
    assert names == ["other/x", "team/a", "team/b2", "team/from-other", "teamX/y"]


def test_a_folder_rename_needs_write_on_both_whole_folders(fresh):
    for name in ("team/sub/c", "other/sub/z"):
        ask(fresh, None, "commit", p.pack_data(b"c"), **commit_fields(name, b"c"))
    for who, src, dest, allowed in (
        ("reader", "team/sub/", "team/sub2/", False),
        ("writer", "team/sub/", "other/sub2/", False),  # out of its folder
        ("writer", "other/sub/", "team/sub3/", False),  # someone else's folder in
        ("writer", "team/", "teamX/", False),  # a grant on "team" is not one on "teamX"
        ("writer", "team/sub/", "team/sub2/", True),
        ("sadmin", "other/sub/", "team/sub3/", True),
    ):
        reply = ask(
            fresh, KEYS[who], "mv_prefix", prefix=src, dest=dest, commit=os.urandom(8).hex()
        )
        assert reply["ok"] is allowed, (who, src, dest, reply)
        if not allowed:
            assert reply["error"] == "forbidden" and "may not mv under" in reply["message"]
    listed = ask(fresh, None, "ls", prefix="")["entries"]
    assert {"team/sub2/c", "team/sub3/z"} <= {e["name"] for e in listed}
    moves = [e for e in ask(fresh, None, "audit")["entries"] if e["op"] == "mv"]
    assert [(e["identity"], e["prefix"], e["dest"], e["moved"]) for e in moves][-2:] == [
        ("writer", "team/sub/", "team/sub2/", 1),
        ("sadmin", "other/sub/", "team/sub3/", 1),
    ]


def test_listings_and_counts_show_only_what_the_identity_may_read(fresh):
    def names(key, **fields):
        return [e["name"] for e in ask(fresh, key, "ls", **fields)["entries"]]

    assert names(None, prefix="") == ["other/x", "team/a", "team/b", "teamX/y"]
    assert names(KEYS["reader"], prefix="") == ["team/a", "team/b"]
    assert names(KEYS["reader"], prefix="team") == ["team/a", "team/b"]  # never teamX
    assert names(KEYS["reader"], prefix="other/") == []
    assert names(KEYS["nobody"], prefix="") == []
    assert names(KEYS["reader"], prefix="", limit=1) == ["team/a"]
    assert names(KEYS["reader"], prefix="", after="team/a") == ["team/b"]
    folders = ask(fresh, KEYS["reader"], "ls", prefix="", folders=True)
    assert folders["folders"] == ["team/"] and folders["entries"] == []
    assert ask(fresh, KEYS["reader"], "du", prefix="")["du"] == {
        "files": 2,
        "bytes": len(SMALL) + 1,
    }
    assert ask(fresh, KEYS["reader"], "du", prefix="other")["du"] == {"files": 0, "bytes": 0}
    assert ask(fresh, KEYS["reader"], "usage")["store"] == {"files": 2, "bytes": len(SMALL) + 1}
    assert set(ask(fresh, KEYS["sadmin"], "usage")["store"]) == {
        "files",
        "bytes",
        "chunks",
        "chunk_bytes",
    }


def test_have_and_commit_tell_nothing_of_content_others_store(fresh):
    """The oracle of the issue: bob cannot tell whether alice stores a content he guesses, nor
    reach it through a manifest that names its chunk."""
    writer = KEYS["writer"]
    guessed = h(OTHER)  # other/x's content, which the writer may not read
    assert ask(fresh, None, "have", hashes=[guessed])["missing"] == []  # the store has it
    assert ask(fresh, writer, "have", hashes=[guessed])["missing"] == [guessed]
    big = OTHER * 10000  # one chunk, committed by its digest alone (no content sent)
    fields = commit_fields("team/stolen", big)
    assert ask(fresh, None, "put_chunk", p.pack_data(big), hash=h(big))["ok"]
    refused = ask(fresh, writer, "commit", **fields)
    assert refused["error"] == "missing_chunks"  # as if absent: upload it
    assert ask(fresh, writer, "chunk", hash=guessed)["error"] == "forbidden"  # no name
    assert ask(fresh, writer, "chunk", hash=guessed, name="team/a")["error"] == "not_found"
    # Uploading it makes it the writer's own: then dedup answers for it.
    put = ask(fresh, writer, "put_chunk", p.pack_data(big), hash=h(big))
    assert put == {**put, "ok": True, "written": True}
    assert ask(fresh, writer, "have", hashes=[h(big)])["missing"] == []
    assert ask(fresh, writer, "commit", **fields)["ok"]
    again = ask(fresh, writer, "put_chunk", p.pack_data(big), hash=h(big))
    assert again["written"] is False


def _put_paged(service, key, name, content):
    """Upload a file whose chunk list is paged (more than 32 chunks of 4 KiB), as ``key``."""
    for chunk in {c: None for c in split(content)}:
        assert ask(service, key, "put_chunk", p.pack_data(chunk), hash=h(chunk))["ok"]
    for page_id, blob in page_blobs(content):
        assert ask(service, key, "put_page", p.pack_data(blob), hash=page_id)["ok"]
    fields = helper_commit_fields(name, content, os.urandom(8).hex())
    del fields["op"]
    return ask(service, key, "commit", **fields)


def test_a_long_chunk_list_tells_nothing_either(fresh):
    """Pages: a page listing someone else's chunks, or a commit naming someone else's pages,
    is refused as missing until the sender uploads them itself."""
    content = b"".join(os.urandom(4096) for _ in range(40))  # 40 chunks: a paged list
    assert _put_paged(fresh, None, "other/paged", content)["ok"]
    [(page_id, blob)] = page_blobs(content)
    writer = KEYS["writer"]
    refused = ask(fresh, writer, "put_page", p.pack_data(blob), hash=page_id)
    assert refused["error"] == "missing_chunks" and len(refused["missing"]) == 40
    fields = helper_commit_fields("team/paged", content, "c-paged")
    del fields["op"]
    refused = ask(fresh, writer, "commit", **fields)
    assert refused["error"] == "missing_chunks" and refused["missing"] == [page_id]
    assert _put_paged(fresh, writer, "team/paged", content)["ok"]  # its own upload: fine


def test_a_chunk_of_a_long_list_is_read_by_its_page_and_place(fresh):
    content = b"".join(os.urandom(4096) for _ in range(40))
    assert _put_paged(fresh, None, "team/paged", content)["ok"]
    assert _put_paged(fresh, None, "other/paged", content[4096:] + content[:4096])["ok"]
    [(page_id, _blob)] = page_blobs(content)
    reader, digests = KEYS["reader"], [h(c) for c in split(content)]
    manifest = ask(fresh, reader, "get", name="team/paged")["manifest"]
    assert manifest["pages"] == [page_id]
    assert ask(fresh, reader, "page", hash=page_id, name="team/paged")["ok"]
    assert ask(fresh, reader, "page", hash=manifest["body"], name="team/paged")["ok"]
    other = ask(fresh, None, "get", name="other/paged")["manifest"]["pages"][0]
    assert ask(fresh, reader, "page", hash=other, name="team/paged")["error"] == "not_found"
    assert ask(fresh, reader, "page", hash=other, name="other/paged")["error"] == "forbidden"
    ok = ask(fresh, reader, "chunk", hash=digests[7], name="team/paged", page=page_id, at=7)
    assert ok["ok"]
    wrong = ask(fresh, reader, "chunk", hash=digests[7], name="team/paged", page=page_id, at=8)
    assert wrong["error"] == "not_found"
    assert ask(fresh, reader, "chunk", hash=digests[7], name="team/paged")["error"] == "not_found"


def test_an_inline_commit_makes_its_chunk_the_uploader_s(fresh):
    writer = KEYS["writer"]
    assert ask(fresh, writer, "commit", p.pack_data(OTHER), **commit_fields("team/o", OTHER))["ok"]
    assert ask(fresh, writer, "have", hashes=[h(OTHER)])["missing"] == []


def test_refused_changes_are_in_the_audit_log(fresh):
    ask(fresh, KEYS["writer"], "rm", name="other/x", commit="r9")
    ask(fresh, KEYS["writer"], "rm", name="team/b", commit="r10")
    log = ask(fresh, KEYS["sadmin"], "audit")["entries"]
    assert [(e["op"], e["identity"], e["names"], e["result"]) for e in log[-2:]] == [
        ("rm", "writer", ["other/x"], "forbidden"),
        ("rm", "writer", ["team/b"], "ok"),
    ]


def test_every_kind_of_change_is_in_the_audit_log_as_its_identity(fresh):
    writer, admin = KEYS["writer"], KEYS["sadmin"]
    seen = ask(fresh, admin, "audit")["entries"][-1]["seq"]
    steps = [
        (writer, "commit", commit_fields("team/n", b"n"), p.pack_data(b"n")),
        (writer, "cp", {"src": "team/n", "name": "team/c", "commit": "a2"}, None),
        (writer, "mv", {"src": "team/c", "name": "team/m", "commit": "a3"}, None),
        (writer, "restore", {"name": "team/a", "version": 1, "commit": "a4"}, None),
        (writer, "rm", {"name": "team/m", "commit": "a5"}, None),
        (writer, "rm_prefix", {"prefix": "team"}, None),
        (admin, "purge", {"name": "team/a", "version": 3}, None),
        (admin, "gc", {"grace": 0}, None),
        (admin, "grant", {"name": "nobody", "role": "read", "prefix": "x"}, None),
        (admin, "revoke", {"name": "nobody", "prefix": "x"}, None),
    ]
    for key, op, fields, data in steps:
        assert ask(fresh, key, op, data, **fields)["ok"], op
    log = ask(fresh, admin, "audit", seq=seen)["entries"]
    assert [(e["identity"], e["op"], e["result"]) for e in log] == [
        ("writer", "put", "ok"),
        ("writer", "cp", "ok"),
        ("writer", "mv", "ok"),
        ("writer", "restore", "ok"),
        ("writer", "rm", "ok"),
        *[("writer", "rm -r", "ok")] * 3,  # team/a, team/b, team/n: one entry per name
        ("sadmin", "purge", "ok"),
        ("sadmin", "gc", "ok"),
        ("sadmin", "grant", "ok"),
        ("sadmin", "revoke", "ok"),
    ]
    assert log[1]["names"] == ["team/n", "team/c"] and log[3]["names"] == ["team/a"]
    assert {e["prefix"] for e in log[5:8]} == {"team/"}
    assert log[8]["names"] == ["team/a"] and log[8]["versions"] == [3]
    assert all(isinstance(e["time"], float) for e in log)


def test_a_header_cannot_claim_an_identity(fresh):
    reply = ask(fresh, KEYS["writer"], "rm", name="other/x", commit="r1", **{"as": "sadmin"})
    assert reply["error"] == "forbidden" and "may not act for another" in reply["message"]
    # A gateway may: as the identity it names, with that one's grants.
    assert ask(fresh, KEYS["gateway"], "stat", name="team/a", **{"as": "reader"})["ok"]
    denied = ask(fresh, KEYS["gateway"], "stat", name="other/x", **{"as": "reader"})
    assert denied["error"] == "forbidden" and "'reader'" in denied["message"]


def test_whoami(fresh):
    assert ask(fresh, KEYS["reader"], "whoami")["grants"] == [{"role": "read", "prefix": "team"}]
    assert ask(fresh, None, "whoami")["identity"] == "local"
    assert ask(fresh, "U" * 40, "whoami")["identity"] == "unknown"


def test_a_gateway_resolves_s3_access_keys(fresh):
    made = ask(fresh, KEYS["sadmin"], "id_key", name="writer", s3=True)["s3"]
    found = ask(fresh, KEYS["gateway"], "s3_key", access_key=made["access_key"])
    assert found["identity"] == "writer" and found["secret"] == made["secret"]
    assert found["grants"] == [{"role": "write", "prefix": "team"}]
    assert ask(fresh, KEYS["gateway"], "s3_key", access_key="FMSNOPE")["identity"] is None
    refused = ask(fresh, KEYS["writer"], "s3_key", access_key=made["access_key"])
    assert refused["error"] == "forbidden"


def test_the_first_admin_is_made_once_with_its_key_in_the_data_directory(tmp_path):
    from fms.security import load_public, load_secret
    from fms.storage.access import ensure_first_admin

    store = open_local(str(tmp_path))
    try:
        made = ensure_first_admin(store.meta, str(tmp_path))
        assert made == str(tmp_path / "admin.key_secret")
        assert os.stat(made).st_mode & 0o077 == 0  # private
        public = load_secret(made)[0]
        assert public == load_public(str(tmp_path / "admin.key"))
        [admin] = store.meta.identities()
        assert admin["keys"] == [{"kind": "curve", "key": public.decode()}]
        assert admin["grants"] == [{"role": "admin", "prefix": ""}]
        assert ensure_first_admin(store.meta, str(tmp_path)) is None  # once per store
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".first-admin")]
    finally:
        store.close()


def test_the_cli_shows_what_a_name_holds():
    from fms.cli.commands import shown

    assert shown("café/photo 1.jpg") == "café/photo 1.jpg"
    assert shown("invoice\u202efdp.exe") == "invoice\\u202efdp.exe"
    assert shown("a\u2028b\\c") == "a\\u2028b\\\\c"  # a line separator; the \\ doubled then
    assert shown("x\U000e0001") == "x\\U000e0001"


# --- the cache decides its hits with the same module ---


def _cache(tmp_path, snapshot=True):
    from test_cache import Link

    from fms.cache import CacheService, ChunkCache

    service = CacheService(ChunkCache(str(tmp_path / "cache"), 10 * p.MiB), Link())
    if snapshot:
        service.on_policy(
            Policy(
                1,
                [
                    ("reader", [KEYS["reader"]], [Grant(READ, "team")], False),
                    ("gateway", [KEYS["gateway"]], [], True),
                ],
            )
        )
    return service


def _fill(service, name, content):
    """As the cache does on a miss for the local user: ask, and storage answers."""
    from test_cache import Frame, manifest_of

    service.handle_request(
        {"t": "req", "k": 0}, {"v": p.PROTOCOL_VERSION, "op": "get", "id": 0, "name": name}, None
    )
    _, fetch = service.link.requests[-1]
    service.handle_reply(
        p.ok_reply(fetch["id"], manifest=manifest_of(name, content)), Frame(p.pack_data(content))
    )


def _cache_ask(service, key, op, **fields):
    before = len(service.link.replies)
    route = {"t": "req", "k": 9} if key is None else {"t": "req", "k": 9, "u": key}
    try:
        service.handle_request(route, {"v": p.PROTOCOL_VERSION, "op": op, "id": 9, **fields}, None)
    except FmsError as exc:
        return {"ok": False, "error": exc.code, "message": str(exc)}
    replies = service.link.replies[before:]
    return replies[-1][1] if replies else None  # None: it went to storage


def test_the_cache_refuses_a_hit_the_identity_may_not_read(tmp_path):
    service = _cache(tmp_path)
    _fill(service, "team/a", SMALL)
    _fill(service, "other/x", OTHER)
    assert _cache_ask(service, KEYS["reader"], "get", name="team/a")["ok"]
    refused = _cache_ask(service, KEYS["reader"], "get", name="other/x")
    assert (
        refused["error"] == "forbidden" and "'reader' may not get 'other/x'" in refused["message"]
    )
    assert _cache_ask(service, "U" * 40, "get", name="team/a")["error"] == "forbidden"
    batch = _cache_ask(service, KEYS["reader"], "get_many", names=["team/a", "other/x"])
    assert [r.get("error") for r in batch["results"]] == [None, "forbidden"]
    as_reader = _cache_ask(service, KEYS["gateway"], "get", name="other/x", **{"as": "reader"})
    assert as_reader["error"] == "forbidden"
    assert _cache_ask(service, None, "get", name="other/x")["ok"]  # no CURVE: the local user


def test_the_cache_reads_a_chunk_only_by_a_file_the_identity_may_read(tmp_path):
    service = _cache(tmp_path)
    _fill(service, "team/a", SMALL)
    _fill(service, "other/x", OTHER)
    mine, theirs = h(SMALL), h(OTHER)
    assert _cache_ask(service, KEYS["reader"], "chunk", hash=mine, name="team/a")["ok"]
    assert _cache_ask(service, KEYS["reader"], "chunk", hash=theirs)["error"] == "forbidden"
    refused = _cache_ask(service, KEYS["reader"], "chunk", hash=theirs, name="other/x")
    assert refused["error"] == "forbidden"
    # A name it may read whose manifest does not list the chunk: storage decides, for it.
    asked = len(service.link.requests)
    assert _cache_ask(service, KEYS["reader"], "chunk", hash=theirs, name="team/a") is None
    [(svc, fetch)] = service.link.requests[asked:]
    assert (svc, fetch["hash"], fetch["name"], fetch["as"]) == (
        p.STORAGE,
        theirs,
        "team/a",
        "reader",
    )
    service.handle_reply(p.error_reply(fetch["id"], "not_found", "no such chunk"), None)
    assert service.link.replies[-1][1]["error"] == "not_found"


def test_the_cache_without_the_store_s_identities_asks_keyed_clients_to_retry(tmp_path):
    service = _cache(tmp_path, snapshot=False)
    _fill(service, "team/a", SMALL)
    assert _cache_ask(service, KEYS["reader"], "get", name="team/a")["error"] == "unavailable"
    assert _cache_ask(service, None, "get", name="team/a")["ok"]
    service.on_policy(Policy(5, [("reader", [KEYS["reader"]], [Grant(READ, "team")], False)]))
    service.on_policy(Policy(4, []))  # older: ignored
    assert _cache_ask(service, KEYS["reader"], "get", name="team/a")["ok"]


# --- the broker passes on the key it authenticated, and the store's snapshot ---


def test_the_broker_routes_the_authenticated_key_and_passes_snapshots_on():
    import msgpack
    from test_broker_core import Recorder, ask, ready

    from fms.broker import Core

    let_in = []
    core = Core(Recorder(), store="s1", on_keys=let_in.append)
    ready(core, b"s-a", p.STORAGE)
    ready(core, b"s-b", p.STORAGE)
    ready(core, b"c-1", p.CACHE)
    welcomes = [r for to, _i, r, _h in core.transport.take() if r["t"] == "welcome"]
    assert welcomes and all(r["pol"] is True for r in welcomes)
    core.client_message(
        b"bob",
        [p.encode({"v": p.PROTOCOL_VERSION, "op": "stat", "id": 1, "name": "x"})],
        lambda frame: {"u": KEYS["writer"]},
    )
    core.client_message(
        b"old",
        [p.encode({"v": p.PROTOCOL_VERSION, "op": "stat", "id": 2, "name": "x"})],
        lambda frame: {"u": KEYS["sadmin"], "l": True},
    )
    ask(core, b"local", "stat", 3, name="x")  # no CURVE
    routes = {h["id"]: r for to, i, r, h in core.transport.take() if to == "worker"}
    assert routes[1]["u"] == KEYS["writer"] and "l" not in routes[1]
    assert routes[2]["u"] == KEYS["sadmin"] and routes[2]["l"] is True
    assert "u" not in routes[3] and "l" not in routes[3]

    snapshot = Policy(7, [("bob", [KEYS["writer"]], [Grant(WRITE, "bob")], False)])
    frames = [
        p.encode({"t": "policy", "e": 7}),
        p.pack_data(msgpack.packb(snapshot.to_wire(), use_bin_type=True)),
    ]

    def sent() -> list:
        """(ident, route) of each message since the last call (policy ones carry data)."""
        out = [(i, p.decode(f[0], "route")) for _to, i, f in core.transport.sent]
        core.transport.sent.clear()
        return out

    core.worker_message(b"s-a", frames)
    passed = [(i, r["e"]) for i, r in sent() if r["t"] == "policy"]
    assert sorted(passed) == [(b"c-1", 7), (b"s-b", 7)]  # not back to its sender
    assert let_in == [frozenset({KEYS["writer"]})]
    core.worker_message(b"s-b", [p.encode({"t": "policy", "e": 6}), frames[1]])  # older
    core.worker_message(b"c-1", [p.encode({"t": "policy", "e": 9}), frames[1]])  # not storage's
    assert core.keys.epoch == 7 and not sent() and len(let_in) == 1
    ready(core, b"c-2", p.CACHE)  # a worker that joins gets the newest after its welcome
    assert [r["t"] for i, r in sent() if i == b"c-2"] == ["welcome", "policy"]


def test_the_cache_reads_a_chunk_of_a_long_list_by_its_cached_page(tmp_path):
    from storage_helpers import manifest_of

    service = _cache(tmp_path)
    content = b"".join(os.urandom(4096) for _ in range(40))
    manifest = manifest_of("team/long", content)
    [(page_id, blob)] = page_blobs(content)
    digests = [h(c) for c in split(content)]
    assert service.manifests.fill("team/long", manifest, service.manifests.begin_fetch())
    reader = KEYS["reader"]
    asked = len(service.link.requests)
    # The page is not cached yet: storage decides (for the reader), then the cache holds it.
    assert (
        _cache_ask(service, reader, "chunk", hash=digests[3], name="team/long", page=page_id, at=3)
        is None
    )
    assert service.link.requests[asked][1]["as"] == "reader"
    service.chunks.put(page_id, memoryview(blob))
    service.chunks.put(digests[3], memoryview(split(content)[3]))
    asked = len(service.link.requests)
    hit = _cache_ask(
        service, reader, "chunk", hash=digests[3], name="team/long", page=page_id, at=3
    )
    assert hit["ok"] and len(service.link.requests) == asked  # decided and served here
    assert _cache_ask(service, reader, "page", hash=page_id, name="team/long")["ok"]
    wrong = _cache_ask(
        service, reader, "chunk", hash=digests[3], name="team/long", page=page_id, at=4
    )
    assert wrong is None and service.link.requests[-1][1]["at"] == 4  # storage decides


def test_a_refusal_shows_a_few_grants_of_many_and_says_how_many_more():
    """However many grants an identity has, its refusals stay short: the broker reserved a
    few KiB for such a reply, and a list of thousands helps nobody."""
    many = [Grant(READ, f"team-{i:04d}/" + "x" * 500) for i in range(1000)]
    who = Identity("carol", many)
    with pytest.raises(Forbidden) as refused:
        policy.check(who, "rm", "alice/report.pdf")
    text = str(refused.value)
    assert len(text.encode()) < 2048
    assert text.count("read on ") == policy.SHOWN_GRANTS
    assert f"and {1000 - policy.SHOWN_GRANTS} more" in text and "fms id ls" in text
    assert "'team-0000/x" in text and "more characters" in text  # each folder cut
    # a few grants are shown whole, with nothing added
    few = Identity("dave", [Grant(WRITE, "dave"), Grant(READ, "shared")])
    assert few.describe() == "write on 'dave', read on 'shared'"


def test_a_refusal_fits_the_reply_room_whatever_its_name_and_grants():
    """The broker reserves SMALL_REPLY (4 KiB) for the reply to most ops, and a refusal is one:
    it fits, with a name of 1,024 bytes (printable ASCII, shown whole; or characters that repr
    spells out, \\U000f0000 ten bytes for four) and folders of 4-byte characters, which a cut
    by characters left at 320 bytes each."""
    from fms.broker.admission import SMALL_REPLY

    def refusal(who, check, *args):
        with pytest.raises(Forbidden) as refused:
            check(who, *args)
        text = str(refused.value)
        assert len(p.encode(p.error_reply(2**63, "forbidden", text))) <= SMALL_REPLY, text[:200]
        return text

    emoji = Identity("e" * 64, [Grant(READ, f"{i:03d}" + "\U0001f600" * 255) for i in range(9)])
    plain = "a/" + "b" * 1022
    text = refusal(emoji, policy.check, "rm", plain)
    assert text.count(repr(plain)) == 2  # a printable name shows whole
    assert text.count("\U0001f600") < 8 * 80 and "and 1 more" in text
    hidden = "a/" + "\U000f0000" * 255
    for who in (emoji, Identity("nobody")):
        text = refusal(who, policy.check, "rm", hidden)
        assert "'a/\\U000f0000" in text and "more characters" in text  # cut, and says so
        refusal(who, policy.check_folder, "rm_prefix", hidden)
        refusal(who, policy.check_folder, "rm_prefix", "\\" * 1023)  # each one spelled \\


def test_a_commit_manys_refusal_of_a_long_name_fits_the_room_reserved_for_each_file(fresh):
    """A refusal names the file twice and the identity's grants (up to about 3 KiB); the broker
    reserves RESULT_MESSAGE_MAX bytes for each file's message in a commit_many's reply, so
    storage cuts a longer one: what it says first (the op, who, the name's start) stays."""
    long = "other/" + "é" * 500  # 1,006 bytes of UTF-8, not the writer's to write
    files = {"team/short": b"ok", long: b"refused"}
    reply = commit_files(fresh, KEYS["writer"], files, "z")
    assert [r["ok"] for r in reply["results"]] == [True, False]
    refused = reply["results"][1]
    assert refused["error"] == "forbidden"
    message = refused["message"]
    assert len(message.encode()) <= p.RESULT_MESSAGE_MAX
    assert message.startswith("forbidden: 'writer' may not") and "'other/éé" in message
    assert message.endswith("more characters)")
    # a message that fits is left whole
    assert p.result_message("forbidden: short") == "forbidden: short"
