"""The S3 gateway as the tests run it: ``fms s3`` as a real process on a random loopback port,
over HTTP or HTTPS (a self-signed certificate made with openssl), in front of a
:class:`harness.Cluster`; and where the S3 command-line tools are found.

Fixture ``s3_site`` (session): one cluster (a storage worker keeping 3 versions) with two
gateways, ``{"http": Gateway, "https": Gateway}``, shared by the S3 test modules of a test
process; each test makes its own bucket."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from harness import START_TIMEOUT, Cluster, Proc, wait_for

KEY_ID = "FMSTESTKEY0000000001"
SECRET = "fms-test-secret-0123456789abcdefghijklmn"
TOOLS_VENV = ".venv-s3tools"  # .ci/run installs aws cli and s3cmd here (their own pins)


class Gateway:
    """A running ``fms s3``: ``url``, ``key_id``, ``secret``, ``ca`` (the certificate to trust,
    for HTTPS), ``proc``.

    :param static: give it the static test key (:data:`KEY_ID`); else only the store's keys.
    :param extra: more arguments (``--key-cache``, ``--curve-secret``, ...).
    """

    def __init__(
        self,
        cluster,
        folder,
        tls: bool = False,
        name: str = "s3",
        static: bool = True,
        extra: tuple = (),
    ):
        self.key_id, self.secret, self.ca, self.folder = KEY_ID, SECRET, None, str(folder)
        args = ["--broker", cluster.frontend, "--port", "0", *extra]
        if static:
            args += ["--access-key", KEY_ID, "--secret-key", SECRET]
        if tls:
            self.ca, key = make_certificate(folder)
            args += ["--tls-cert", self.ca, "--tls-key", key]
        self.proc = Proc(name, "s3", args, os.path.join(folder, f"{name}.log"))
        cluster.procs.append(self.proc)
        pattern = re.compile(r"S3 gateway at (https?://127\.0\.0\.1:\d+)")
        match = wait_for(
            lambda: pattern.search(self.proc.log()) or (not self.proc.alive() and self.proc.log()),
            START_TIMEOUT,
            "the S3 gateway to listen",
        )
        assert isinstance(match, re.Match), f"fms s3 failed to start:\n{self.proc.log()}"
        self.url = match.group(1)

    def boto3(self, key_id: str | None = None, secret: str | None = None, **config):
        """A boto3 S3 client of this gateway, signing with the test key or ``key_id``."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=key_id or self.key_id,
            aws_secret_access_key=secret or self.secret,
            region_name="us-east-1",
            verify=self.ca if self.ca else None,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"max_attempts": 2},
                **config,
            ),
        )

    def env(self) -> dict:
        """The environment the AWS tools read their key, CA bundle and configuration from
        (SigV4 for presigned URLs too: the aws cli 1.x presigns with SigV2 unless told)."""
        config = os.path.join(self.folder, "aws-config")
        with open(config, "w") as f:
            f.write("[default]\ns3 =\n    signature_version = s3v4\n")
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.key_id,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=config,
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        )
        if self.ca:
            env["AWS_CA_BUNDLE"] = self.ca
        return env


def make_certificate(folder) -> tuple:
    """A self-signed certificate for 127.0.0.1 and localhost: ``(cert.pem, key.pem)``."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    if not os.path.exists(cert):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return cert, key


def tool(name: str) -> str:
    """The path of an S3 command-line tool (aws, s3cmd: in the tools' venv that .ci/run makes;
    rclone: Debian's), or a skip saying how to install it (a failure under CI=true)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (
        os.path.join(root, TOOLS_VENV, "bin", name),
        os.path.join(os.path.dirname(sys.executable), name),
        shutil.which(name),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    reason = f"{name} is not installed (bash .ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_site(tmp_path_factory):
    pytest.importorskip("aiohttp")
    folder = tmp_path_factory.mktemp("s3site")
    cluster = Cluster(folder)
    try:
        cluster.start_broker()
        cluster.start_cache()
        cluster.start_storage(wid="storage-1", extra=["--keep-versions", "3"])
        cluster.wait_workers(storage=1, cache=1)
        yield {
            "http": Gateway(cluster, str(folder)),
            "https": Gateway(cluster, str(folder), tls=True, name="s3tls"),
        }
    finally:
        cluster.stop()
