"""An isolated L2 network for whole-system tests, built with ``ip netns`` (root only).

    with Network() as net:              # 10.213.X.0/24, X random and unused on this machine
        a = net.add("a")                # a namespace on the bridge, address 10.213.X.2
        subprocess.run(a.exec(["ip", "-o", "addr"]))
        httpx.get(f"http://{a.address}:8000/")   # the test process reaches it too

A "hub" namespace holds a bridge; every namespace the test adds has a veth to it and an address
of its own; one more veth joins the root namespace to the bridge, with an address of its own
(``host_address``, which brings the subnet's route with it), so that the test process
reaches every namespace. Nothing else of the machine is touched: no existing interface,
address, route or sysctl. ``close()`` (or the end
of the ``with`` block) deletes the namespaces and the root-side veth; a namespace's processes
must have ended by then (they keep a deleted namespace alive).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["IP", "Namespace", "Network", "NetworkUnavailable", "unavailable"]

IP = shutil.which("ip")
NSENTER = shutil.which("nsenter")
_PREFIX = "10.213"  # the test's own private range: 10.213.X.0/24


class NetworkUnavailable(Exception):
    """This machine cannot build the test network (not root, no ``ip``, no namespaces)."""


def unavailable() -> str | None:
    """Why a test network cannot be built here without trying, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns)"
    if IP is None:
        return "the ip command (iproute2) is not installed"
    return None


def _ip(*args: str) -> str:
    """Run ``ip ARGS``; its output, or ``NetworkUnavailable`` with what it printed."""
    done = subprocess.run([str(IP), *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetworkUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass(frozen=True)
class Namespace:
    """A network namespace on the test bridge: ``address`` is its own on it."""

    name: str
    address: str
    link: str  # its veth's end on the bridge, in the hub namespace
    hub: str

    def exec(self, command: list[str]) -> list[str]:
        """``command`` run inside this namespace, as the same process (it is exec'd, so a
        signal to the process reaches the command). nsenter enters the network namespace
        alone; ``ip netns exec``, used where nsenter is missing, also mounts a /sys of its
        own, which hides the cgroup hierarchy from the command."""
        if NSENTER is not None:
            return [NSENTER, f"--net=/run/netns/{self.name}", "--", *command]
        return [str(IP), "netns", "exec", self.name, *command]

    def cut(self) -> None:
        """Take its link off the bridge, as a pulled cable does: its packets are lost,
        nobody is told (no reset, no refusal)."""
        _ip("-n", self.hub, "link", "set", self.link, "down")

    def mend(self) -> None:
        """Put its link back on the bridge."""
        _ip("-n", self.hub, "link", "set", self.link, "up")


class Network:
    """The test network: see the module's docstring."""

    def __init__(self) -> None:
        why = unavailable()
        if why is not None:
            raise NetworkUnavailable(why)
        self.tag = secrets.token_hex(3)  # names unique to this network: several may run at once
        self.hub = f"omni-test-{self.tag}-hub"
        self.host_link = f"omni{self.tag}"  # the root-side veth (at most 15 characters)
        self.subnet = ""
        self.host_address = ""
        self.namespaces: list[Namespace] = []
        self._created: list[str] = []
        self._closed = False

    # -- building ------------------------------------------------------------------------

    def _free_subnet(self) -> str:
        used = set(re.findall(rf"inet {re.escape(_PREFIX)}\.(\d+)\.", _ip("-o", "addr")))
        free = [x for x in range(1, 255) if str(x) not in used]
        if not free:
            raise NetworkUnavailable(f"every {_PREFIX}.X.0/24 is in use on this machine")
        return f"{_PREFIX}.{random.SystemRandom().choice(free)}"

    def _namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def open(self) -> Network:
        atexit.register(self.close)  # even when the test run is interrupted
        try:
            self._namespace(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            _ip("link", "add", self.host_link, "type", "veth",
                "peer", "name", "host", "netns", self.hub)  # fmt: skip
            _ip("-n", self.hub, "link", "set", "host", "master", "br0", "up")
            self.subnet = self._free_subnet()
            self.host_address = f"{self.subnet}.1"
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            # Another test network may have taken the same range meanwhile: give it up.
            holders = re.findall(
                rf"^\d+: (\S+)\s+inet {re.escape(self.subnet)}\.", _ip("-o", "addr"), re.M
            )
            if set(holders) != {self.host_link}:
                raise NetworkUnavailable(f"{self.subnet}.0/24 was taken by {holders} meanwhile")
        except BaseException:
            self.close()
            raise
        return self

    def add(self, role: str) -> Namespace:
        """A new namespace on the bridge, with the next address of the subnet."""
        index = len(self.namespaces) + 2
        namespace = Namespace(
            name=f"omni-test-{self.tag}-{role}",
            address=f"{self.subnet}.{index}",
            link=f"p{index}",
            hub=self.hub,
        )
        self._namespace(namespace.name)
        _ip("-n", self.hub, "link", "add", namespace.link, "type", "veth",
            "peer", "name", "eth0", "netns", namespace.name)  # fmt: skip
        _ip("-n", self.hub, "link", "set", namespace.link, "master", "br0", "up")
        _ip("-n", namespace.name, "addr", "add", f"{namespace.address}/24", "dev", "eth0")
        _ip("-n", namespace.name, "link", "set", "eth0", "up")
        self.namespaces.append(namespace)
        return namespace

    # -- removing ------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace this network made, and the root-side veth."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for name in reversed(self._created):
            with contextlib.suppress(NetworkUnavailable):
                _ip("netns", "delete", name)
        with contextlib.suppress(NetworkUnavailable):  # gone with the hub, unless it was busy
            if self.host_link in _ip("-o", "link", "show", "dev", self.host_link):
                _ip("link", "delete", self.host_link)

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
