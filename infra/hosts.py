"""Separate hosts on one machine: Linux network namespaces joined by veth pairs to one bridge.

Each host is a network namespace `<tag>-<name>` with its loopback and one interface, `eth0`, at
`<subnet>.<i>/24`; a switch namespace `<tag>-sw` holds the bridge `br0` and the other end of every
pair. Nothing is added to the machine's own namespace: processes started with `prefix(host)` (as
`ip netns exec <ns> ...`) see only their host's address and reach the others through the switch.
Faults act on one host's link: `link(host, up=False)` takes it down (every connection to and from
the host hangs, as a pulled cable or a partition), `throttle(host, "1mbit")` shapes it in both
directions with `tc tbf` (this kernel has no `netem`: no delay or loss, only rate).

Used by the cross-host fault test (tests/faults/test_hosts.py) and for local chaos experiments.
Needs root and iproute2. `Hosts` is a context manager; `destroy` (also run on errors, and at the
start for namespaces a killed earlier run of the same tag left) deletes the namespaces, which
removes their interfaces with them.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Sequence
from types import TracebackType


class HostsError(RuntimeError):
    """A namespace, link or qdisc command failed (its command line and stderr are in the message)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise HostsError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None if hosts can be made here; else why not (not root, no iproute2, namespaces refused)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        probe = f"rlprobe-{uuid.uuid4().hex[:6]}"
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (OSError, HostsError) as e:
        return f"cannot create a network namespace: {e}"
    return None


class Hosts:
    """Hosts `names` on one bridge, at `<subnet>.2`, `<subnet>.3`, ... in the order given."""

    def __init__(self, names: Sequence[str], tag: str | None = None, subnet: str = "10.77.0") -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and not empty: {list(names)}")
        if len(names) > 250:
            raise ValueError("at most 250 hosts on one /24")
        self.names = list(names)
        self.tag = tag or f"rl{uuid.uuid4().hex[:4]}"
        """Prefix of the namespaces and of the veth names (kept short: an interface name has at
        most 15 characters)."""
        if len(self.tag) > 8:
            raise ValueError(f"tag {self.tag!r} is longer than 8 characters")
        self.subnet = subnet
        self.switch = f"{self.tag}-sw"

    def ns(self, host: str) -> str:
        """The namespace of `host`."""
        if host not in self.names:
            raise KeyError(f"unknown host {host!r}; hosts: {self.names}")
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        """The IPv4 address of `host`'s eth0."""
        return f"{self.subnet}.{self.names.index(host) + 2}"

    def prefix(self, host: str) -> list[str]:
        """A command prefix that runs a program on `host` (`ip netns exec`, which execs it: the
        process keeps its PID, so signals reach it directly)."""
        return ["ip", "netns", "exec", self.ns(host)]

    def _port(self, host: str) -> str:
        return f"{self.tag}{self.names.index(host)}p"  # the switch-side end of host's pair

    def create(self) -> Hosts:
        self.destroy()  # namespaces of the same tag a killed earlier run left behind
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.names:
                ns, end, port = self.ns(host), f"{self.tag}{self.names.index(host)}h", self._port(host)
                _ip("netns", "add", ns)
                _ip("link", "add", end, "type", "veth", "peer", "name", port)
                _ip("link", "set", end, "netns", ns)
                _ip("link", "set", port, "netns", self.switch)
                _ip("-n", ns, "link", "set", end, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def link(self, host: str, up: bool) -> None:
        """Take `host`'s link down (no packet in or out) or bring it back up."""
        _ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def throttle(self, host: str, rate: str | None) -> None:
        """Shape `host`'s traffic in both directions to `rate` (a tc rate, e.g. "1mbit") with a
        token bucket; None removes the shaping."""
        for ns, dev in ((self.ns(host), "eth0"), (self.switch, self._port(host))):
            if rate is None:  # no qdisc left to delete is fine
                _ip("netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            else:
                _ip("netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "32kbit", "latency", "400ms")

    def destroy(self) -> None:
        """Delete every namespace of this tag (their interfaces go with them). Idempotent."""
        listed = _ip("netns", "list", check=False).stdout.split()
        for ns in [n for n in listed if n.startswith(f"{self.tag}-")]:
            _ip("netns", "del", ns, check=False)

    def __enter__(self) -> Hosts:
        return self.create()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()
