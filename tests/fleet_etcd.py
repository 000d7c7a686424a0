"""Real etcd for the fleet's tests: ``EtcdCluster`` runs 1 or 3 members on free ports.

    with EtcdCluster(3) as cluster:      # or the fixture: etcd3 = etcd_fixture(3)
        store = await EtcdStore.connect(cluster.endpoints)
        cluster.kill(0)                  # SIGKILL one member

Members may each run in a network namespace of their own, on its address (``tests/e2e/netns.py``):
``EtcdCluster(3, host=[ns.address for ns in spaces], netns=[ns.name for ns in spaces])``.

Tests that use the fixture are skipped when ``etcd`` is not installed (``scripts/setup.sh``
installs Debian's etcd-server when it runs as root).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ETCD = shutil.which("etcd")
IP = shutil.which("ip")
NO_ETCD = "etcd is not installed (scripts/setup.sh installs Debian's etcd-server as root)"
requires_etcd = pytest.mark.skipif(ETCD is None, reason=NO_ETCD)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EtcdCluster:
    """``size`` etcd members on ``host`` (one address for all, or one per member; free client
    and peer ports, data under ``data_dir``, a temporary directory by default), started by
    ``start()`` or ``with``. With ``netns`` (one network namespace per member, ``ip netns``),
    member ``i`` runs inside ``netns[i]``, listening on ``host[i]`` with the ports 2379 and 2380
    of its namespace."""

    def __init__(
        self,
        size: int = 1,
        host: str | Sequence[str] = "127.0.0.1",
        data_dir: Path | None = None,
        netns: Sequence[str] | None = None,
    ):
        if size < 1:
            raise ValueError("an etcd cluster has at least one member")
        self.size = size
        self.hosts = [host] * size if isinstance(host, str) else list(host)
        self.netns = list(netns) if netns is not None else None
        if len(self.hosts) != size or (self.netns is not None and len(self.netns) != size):
            raise ValueError(f"give one host (and one namespace) per member, {size} in all")
        self.host = self.hosts[0]
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="omni-etcd-")) if data_dir is None else data_dir
        )
        if self.netns is not None:  # a namespace of its own: its ports are all free
            self.client_ports, self.peer_ports = [2379] * size, [2380] * size
        else:
            self.client_ports = [_free_port(h) for h in self.hosts]
            self.peer_ports = [_free_port(h) for h in self.hosts]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size

    def _address(self, i: int, port: int) -> str:
        host = self.hosts[i]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _url(self, i: int, port: int) -> str:
        return f"http://{self._address(i, port)}"

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return list(zip(self.hosts, self.client_ports, strict=True))

    @property
    def url(self) -> str:
        """The ``--fleet`` URL: ``etcd://127.0.0.1:P[,...]``."""
        return "etcd://" + ",".join(
            self._address(i, port) for i, port in enumerate(self.client_ports)
        )

    def log(self, i: int) -> str:
        path = self.data_dir / f"m{i}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _command(self, i: int) -> list[str]:
        initial = ",".join(f"m{j}={self._url(j, p)}" for j, p in enumerate(self.peer_ports))
        inside = [] if self.netns is None else [str(IP), "netns", "exec", self.netns[i]]
        return [
            *inside,
            str(ETCD),
            f"--name=m{i}",
            f"--data-dir={self.data_dir / f'm{i}'}",
            f"--listen-client-urls={self._url(i, self.client_ports[i])}",
            f"--advertise-client-urls={self._url(i, self.client_ports[i])}",
            f"--listen-peer-urls={self._url(i, self.peer_ports[i])}",
            f"--initial-advertise-peer-urls={self._url(i, self.peer_ports[i])}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",  # a restarted member reads its data dir instead
            "--initial-cluster-token=omni-test",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]

    def _spawn(self, i: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.data_dir / f"m{i}.log", "ab") as log:
            self.processes[i] = subprocess.Popen(
                self._command(i), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env
            )

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        if ETCD is None:
            raise RuntimeError(NO_ETCD)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self._spawn(i)
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start member ``i`` again (after ``kill``), on its data and ports."""
        self.kill(i)
        self._spawn(i)
        self.wait_healthy(timeout)

    def restart_all(self, timeout: float = 30.0) -> None:
        """Start every member that is not running again, on its data and ports (a cluster
        that lost them all has no quorum until enough of them are back)."""
        stopped = [i for i in range(self.size) if i not in self._running()]
        for i in stopped:
            self._spawn(i)
        self.wait_healthy(timeout)

    def leader(self) -> int:
        """The index of the member that leads the cluster now."""
        ids, leader = {}, None
        for i in self._running():
            status = self._gateway(i, "/v3/maintenance/status", {})
            ids[status["header"]["member_id"]] = i
            leader = status["leader"]
        return ids[leader]

    def _gateway(self, i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A call to member ``i``'s v3 JSON gateway."""
        url = self._url(i, self.client_ports[i]) + path
        request = urllib.request.Request(url, data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=5) as response:
            return dict(json.loads(response.read()))

    def keys(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` and its value, read through a running member."""
        key = prefix.encode()
        end = key[:-1] + bytes([key[-1] + 1])
        body = {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()}
        errors = []
        for i in self._running():
            try:
                found = self._gateway(i, "/v3/kv/range", body)
            except (OSError, ValueError) as exc:
                errors.append(f"m{i}: {exc}")
                continue
            return {
                base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                for kv in found.get("kvs", [])
            }
        raise RuntimeError(f"no member of {self.url} answered a read ({'; '.join(errors)})")

    def move_leader(self, to: int) -> None:
        """Make member ``to`` the cluster's leader (the leader hands over; a few ms)."""
        leader = self.leader()
        if leader == to:
            return
        target = self._gateway(to, "/v3/maintenance/status", {})["header"]["member_id"]
        self._gateway(leader, "/v3/maintenance/transfer-leadership", {"targetID": target})
        deadline = time.monotonic() + 10
        while self.leader() != to:
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd member m{to} did not become the leader in 10s")
            time.sleep(0.1)

    def _running(self) -> list[int]:
        return [i for i, p in enumerate(self.processes) if p is not None and p.poll() is None]

    def healthy(self, i: int) -> bool:
        try:
            url = self._url(i, self.client_ports[i]) + "/health"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member reports a healthy cluster; RuntimeError with their logs."""
        deadline = time.monotonic() + timeout
        running = self._running()
        while not all(self.healthy(i) for i in running):
            exited = [i for i in running if (p := self.processes[i]) and p.poll() is not None]
            if exited or time.monotonic() > deadline:
                logs = "\n".join(f"--- m{i}:\n{self.log(i)[-2000:]}" for i in running)
                why = f"members {exited} exited" if exited else f"not healthy in {timeout:g}s"
                raise RuntimeError(f"etcd cluster on {self.url}: {why}\n{logs}")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``."""
        process = self.processes[i]
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        """Kill every member (a test cluster keeps nothing worth a clean shutdown, and a
        member that has lost its quorum takes seconds to stop on SIGTERM)."""
        for i in range(self.size):
            self.kill(i)
            self.processes[i] = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def etcd_fixture(
    size: int = 1, host: str = "127.0.0.1", scope: Any = "function"
) -> Callable[..., Iterator[EtcdCluster]]:
    """A pytest fixture that runs an ``EtcdCluster`` (skipped when etcd is not installed):
    ``etcd3 = etcd_fixture(3)`` in a test module or conftest.py."""

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
        if ETCD is None:
            pytest.skip(NO_ETCD)
        with EtcdCluster(size, host, tmp_path_factory.mktemp("etcd")) as cluster:
            yield cluster

    return fixture
