"""The S3 gateway with the real clients people use, unchanged, over HTTP and over HTTPS: the
aws cli, boto3, rclone, s3cmd, s3fs and pyarrow.  One cluster with two gateways (HTTP, HTTPS)
serves the module; each test runs against both."""

import filecmp
import os
import subprocess

import pytest
from s3gw import tool

pytest.importorskip("aiohttp")

MiB = 1 << 20
TOOL_TIMEOUT = 120  # seconds one command of a client tool may take


@pytest.fixture(params=["http", "https"])
def gw(request, s3_site):
    return s3_site[request.param]


_seq = [0]


@pytest.fixture
def bucket(gw):
    _seq[0] += 1
    name = f"cli-{os.getpid()}-{_seq[0]}"
    gw.boto3().create_bucket(Bucket=name)
    return name


def run(cmd, env=None, check=True):
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=TOOL_TIMEOUT, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def write(path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_aws_cli(gw, bucket, tmp_path):
    aws = [tool("aws"), "--endpoint-url", gw.url]
    env = gw.env()
    up = tmp_path / "up"
    sizes = {"one": 1, "eight": 8 * MiB, "big": 65 * MiB}
    for name, size in sizes.items():
        write(up / name, size)
    # one `aws s3 cp` each way for the three (each run of the aws cli costs a second to start)
    run([*aws, "s3", "cp", "--recursive", str(up), f"s3://{bucket}/cp/"], env)
    run([*aws, "s3", "cp", "--recursive", f"s3://{bucket}/cp/", str(tmp_path / "down")], env)
    for name in sizes:
        assert filecmp.cmp(up / name, tmp_path / "down" / name, shallow=False), name
    tree = tmp_path / "tree"
    for i in range(5):
        write(tree / f"d{i % 2}" / f"f{i}", 1000 + i)
    first = run([*aws, "s3", "sync", str(tree), f"s3://{bucket}/sync"], env).stdout
    assert first.count("upload:") == 5
    second = run([*aws, "s3", "sync", str(tree), f"s3://{bucket}/sync"], env).stdout
    assert "upload:" not in second  # the second run copies nothing
    head = run([*aws, "s3api", "head-object", "--bucket", bucket, "--key", "cp/eight"], env)
    assert '"ContentLength": 8388608' in head.stdout
    listed = run([*aws, "s3api", "list-objects-v2", "--bucket", bucket, "--prefix", "sync/"], env)
    assert listed.stdout.count('"Key"') == 5
    run(
        [
            *aws,
            "s3api",
            "copy-object",
            "--bucket",
            bucket,
            "--key",
            "copied",
            "--copy-source",
            f"{bucket}/cp/one",
        ],
        env,
    )
    url = run([*aws, "s3", "presign", f"s3://{bucket}/copied", "--expires-in", "60"], env)
    import urllib.request

    context = None
    if gw.ca:
        import ssl

        context = ssl.create_default_context(cafile=gw.ca)
    with urllib.request.urlopen(url.stdout.strip(), timeout=10, context=context) as reply:
        assert reply.read() == (up / "one").read_bytes()
    run([*aws, "s3", "rm", "--recursive", f"s3://{bucket}/sync"], env)
    assert "Contents" not in gw.boto3().list_objects_v2(Bucket=bucket, Prefix="sync/")


def test_boto3_transfer_with_default_checksums(gw, bucket, tmp_path):
    s3 = gw.boto3()
    data = write(tmp_path / "up.bin", 9 * MiB + 5)
    s3.upload_file(str(tmp_path / "up.bin"), bucket, "boto3/up.bin")
    s3.download_file(bucket, "boto3/up.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data


def rclone_env(gw) -> dict:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # rclone's SDK cannot apply it to rclone's transport
    env.update(
        RCLONE_CONFIG_FMS_TYPE="s3",
        RCLONE_CONFIG_FMS_PROVIDER="Other",
        RCLONE_CONFIG_FMS_ENDPOINT=gw.url,
        RCLONE_CONFIG_FMS_ACCESS_KEY_ID=gw.key_id,
        RCLONE_CONFIG_FMS_SECRET_ACCESS_KEY=gw.secret,
        RCLONE_CONFIG_FMS_REGION="us-east-1",
        RCLONE_CONFIG=os.devnull,
    )
    if gw.ca:
        env["RCLONE_CA_CERT"] = gw.ca
    return env


def test_rclone(gw, bucket, tmp_path):
    rclone = tool("rclone")
    env = rclone_env(gw)
    src = tmp_path / "src"
    for i in range(4):
        write(src / f"sub{i % 2}" / f"file{i}", 300_000 * i + 10)
    write(src / "big", 6 * MiB)
    run([rclone, "copy", str(src), f"fms:{bucket}/r"], env)
    check = run([rclone, "check", str(src), f"fms:{bucket}/r"], env)
    assert "0 differences found" in check.stderr
    md5 = run([rclone, "md5sum", f"fms:{bucket}/r/sub0"], env).stdout
    assert len([line for line in md5.splitlines() if line.strip()]) == 2
    (src / "file-new").write_bytes(b"new")
    (src / "sub0" / "file0").unlink()
    run([rclone, "sync", str(src), f"fms:{bucket}/r"], env)
    back = tmp_path / "back"
    run([rclone, "copy", f"fms:{bucket}/r", str(back)], env)
    assert not (back / "sub0" / "file0").exists()
    assert (back / "file-new").read_bytes() == b"new"
    assert filecmp.cmp(src / "big", back / "big", shallow=False)


def test_s3cmd(gw, bucket, tmp_path):
    s3cmd = tool("s3cmd")
    host = gw.url.split("//")[1]
    config = tmp_path / "s3cfg"
    config.write_text(
        "[default]\n"
        f"access_key = {gw.key_id}\nsecret_key = {gw.secret}\n"
        f"host_base = {host}\nhost_bucket = {host}\n"
        f"use_https = {'True' if gw.ca else 'False'}\n"
        f"ca_certs_file = {gw.ca or ''}\ncheck_ssl_certificate = True\n"
        "signature_v2 = False\nbucket_location = us-east-1\n"
    )
    cmd = [s3cmd, "-c", str(config)]
    data = write(tmp_path / "put.bin", 16 * MiB + 3)  # multipart: s3cmd sends 15 MiB parts
    run([*cmd, "put", str(tmp_path / "put.bin"), f"s3://{bucket}/s3cmd/put.bin"])
    run([*cmd, "get", f"s3://{bucket}/s3cmd/put.bin", str(tmp_path / "got.bin")])
    assert (tmp_path / "got.bin").read_bytes() == data
    tree = tmp_path / "tree"
    for i in range(3):
        write(tree / f"t{i}", 100 + i)
    run([*cmd, "sync", str(tree) + "/", f"s3://{bucket}/s3cmd/tree/"])
    again = run([*cmd, "sync", str(tree) + "/", f"s3://{bucket}/s3cmd/tree/"])
    assert "upload:" not in again.stdout
    listed = run([*cmd, "ls", f"s3://{bucket}/s3cmd/tree/"]).stdout
    assert listed.count(f"s3://{bucket}/s3cmd/tree/t") == 3


def test_s3fs(gw, bucket):
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(
        key=gw.key_id,
        secret=gw.secret,
        client_kwargs={"endpoint_url": gw.url, "region_name": "us-east-1", "verify": gw.ca},
        skip_instance_cache=True,
    )
    data = os.urandom(3 * MiB)
    with fs.open(f"{bucket}/fs/data.bin", "wb") as f:
        f.write(data)
    fs.pipe(f"{bucket}/fs/other", b"other")
    assert sorted(fs.ls(f"{bucket}/fs", refresh=True)) == [
        f"{bucket}/fs/data.bin",
        f"{bucket}/fs/other",
    ]
    ranges = fs.cat_ranges(
        [f"{bucket}/fs/data.bin"] * 3, [0, MiB - 5, 3 * MiB - 1], [10, MiB + 5, 3 * MiB]
    )
    assert ranges == [data[:10], data[MiB - 5 : MiB + 5], data[-1:]]
    with fs.open(f"{bucket}/fs/data.bin", "rb", block_size=256 * 1024) as f:
        f.seek(2 * MiB)
        assert f.read(1000) == data[2 * MiB : 2 * MiB + 1000]  # ranged reads with If-Match
    fs.rm(f"{bucket}/fs", recursive=True)
    assert fs.ls(f"{bucket}", refresh=True) == []


def test_pyarrow_parquet(gw, bucket):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from pyarrow import fs as pafs

    scheme, host = gw.url.split("://")
    s3 = pafs.S3FileSystem(
        access_key=gw.key_id,
        secret_key=gw.secret,
        endpoint_override=host,
        scheme=scheme,
        region="us-east-1",
        tls_ca_file_path=gw.ca,
    )
    table = pa.table({"n": list(range(100_000)), "s": [f"row {i}" for i in range(100_000)]})
    pq.write_table(table, f"{bucket}/parquet/t.parquet", filesystem=s3)
    back = pq.read_table(f"{bucket}/parquet/t.parquet", filesystem=s3)
    assert back.equals(table)
    info = s3.get_file_info(f"{bucket}/parquet/t.parquet")
    assert info.size > 0
