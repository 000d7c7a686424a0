"""Real etcd for the fleet's tests: ``EtcdCluster`` runs 1 or 3 members on free ports.

    with EtcdCluster(3) as cluster:      # or the fixture: etcd3 = etcd_fixture(3)
        store = await EtcdStore.connect(cluster.endpoints)
        cluster.kill(0)                  # SIGKILL one member

Tests that use the fixture are skipped when ``etcd`` is not installed (``scripts/setup.sh``
installs Debian's etcd-server when it runs as root).
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ETCD = shutil.which("etcd")
NO_ETCD = "etcd is not installed (scripts/setup.sh installs Debian's etcd-server as root)"
requires_etcd = pytest.mark.skipif(ETCD is None, reason=NO_ETCD)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EtcdCluster:
    """``size`` etcd members on ``host`` (free client and peer ports, data under
    ``data_dir``, a temporary directory by default), started by ``start()`` or ``with``."""

    def __init__(self, size: int = 1, host: str = "127.0.0.1", data_dir: Path | None = None):
        if size < 1:
            raise ValueError("an etcd cluster has at least one member")
        self.size = size
        self.host = host
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="omni-etcd-")) if data_dir is None else data_dir
        )
        self.client_ports = [_free_port(host) for _ in range(size)]
        self.peer_ports = [_free_port(host) for _ in range(size)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size

    def _url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, port) for port in self.client_ports]

    @property
    def url(self) -> str:
        """The ``--fleet`` URL: ``etcd://127.0.0.1:P[,...]``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return "etcd://" + ",".join(f"{host}:{port}" for port in self.client_ports)

    def log(self, i: int) -> str:
        path = self.data_dir / f"m{i}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _command(self, i: int) -> list[str]:
        initial = ",".join(f"m{j}={self._url(p)}" for j, p in enumerate(self.peer_ports))
        return [
            str(ETCD),
            f"--name=m{i}",
            f"--data-dir={self.data_dir / f'm{i}'}",
            f"--listen-client-urls={self._url(self.client_ports[i])}",
            f"--advertise-client-urls={self._url(self.client_ports[i])}",
            f"--listen-peer-urls={self._url(self.peer_ports[i])}",
            f"--initial-advertise-peer-urls={self._url(self.peer_ports[i])}",
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

    def leader(self) -> int:
        """The index of the member that leads the cluster now."""
        ids, leader = {}, None
        for i in self._running():
            request = urllib.request.Request(
                self._url(self.client_ports[i]) + "/v3/maintenance/status", data=b"{}"
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                status = json.loads(response.read())
            ids[status["header"]["member_id"]] = i
            leader = status["leader"]
        return ids[leader]

    def _running(self) -> list[int]:
        return [i for i, p in enumerate(self.processes) if p is not None and p.poll() is None]

    def healthy(self, i: int) -> bool:
        try:
            url = self._url(self.client_ports[i]) + "/health"
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
