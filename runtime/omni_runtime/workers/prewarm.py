"""Pre-warmed processes: one per model environment that has recently served, forking workers.

A worker forked from one skips the interpreter's start and the imports its environment's
models made before (what the runtime's base layer provides of them; a model's own modules are
never imported ahead). The fork then takes exactly the path of a fresh worker: its own session,
its cgroup (joined while it is stopped, before it runs anything), its sandbox, its model.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omni_runtime.isolation import WorkerCgroup

__all__ = ["ForkedProcess", "PrewarmedProcess", "trusted_modules"]

log = logging.getLogger("omni.prewarm")
# Of what a worker says it imported, at most this many modules, from this many packages, are
# looked at (transformers with torch is about 3,500 modules from 150 packages).
MAX_MODULES = 20_000
MAX_PACKAGES = 1_000
_STOP_WAIT = 2.0  # seconds a fork may take to reach its SIGSTOP


class ForkedProcess:
    """A worker forked by a pre-warmed process: what the supervisor needs of a subprocess."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, exited: asyncio.Future[int]):
        self.pid = pid
        self.stdout = stdout
        self._exited = exited
        self.returncode: int | None = None
        exited.add_done_callback(self._ended)

    def _ended(self, future: asyncio.Future[int]) -> None:
        if not future.cancelled():
            self.returncode = future.result()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class PrewarmedProcess:
    """``python -m omni_sdk.prewarm`` for one environment's interpreter."""

    def __init__(self, python: str, preload: list[str], label: str = "") -> None:
        self.python = python
        self.preload = preload
        # The (interpreter, package directory) of the model it pre-warms for.
        self.made_for: tuple[str, Path | None] = (python, None)
        self.label = label or python
        self.cgroup: WorkerCgroup | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.children: dict[int, asyncio.Future[int]] = {}
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self.started_at = 0.0
        self.retired = False
        self.refused: str | None = None  # why it would not pre-warm, when it said so
        self.refused_kind = ""
        self.refused_module = ""  # the package it blames, to leave out next time
        self.forked = 0  # workers it has forked
        self.on_refused: Callable[[PrewarmedProcess], None] | None = None
        self._relay: asyncio.Future[None] | None = None

    @property
    def alive(self) -> bool:
        """Not retired, and starting or running."""
        return not self.retired and (self.process is None or self.process.returncode is None)

    @property
    def ended(self) -> bool:
        """Its process is gone (or never started): nothing more to track."""
        return (
            self.retired
            and not self.children
            and (self.process is None or self.process.returncode is not None)
        )

    async def start(
        self, env: dict[str, str], launcher: Callable[[int], list[str]] | None = None
    ) -> None:
        """Start it; ``launcher(fd)`` is the sandbox command that keeps control socket ``fd``."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [
            *(launcher(child.fileno()) if launcher else []),
            self.python,
            "-P",  # not the package directory first on sys.path: no model module shadows ours
            "-m",
            "omni_sdk.prewarm",
            "--fd",
            str(child.fileno()),
        ]
        if self.preload:
            command += ["--preload", "-"]  # the names come on stdin: they can be thousands
        for root in sorted({sys.prefix, sys.base_prefix}):
            command += ["--trusted", root]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        finally:
            child.close()
        assert self.process.stdin is not None
        self.process.stdin.write("\n".join(self.preload).encode())
        with contextlib.suppress(OSError):  # (it exited already: its stderr says why)
            await self.process.stdin.drain()
        self.process.stdin.close()
        parent.setblocking(False)
        self.sock = parent
        self.started_at = time.monotonic()
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable)
        if self.retired:  # retired while it started
            self.retired = False
            self.retire()
        self._relay = asyncio.ensure_future(self._relay_stderr())

    async def _relay_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            log.info("prewarm %s: %s", self.label, line.decode(errors="replace").rstrip())

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            message = json.loads(data)
            if "refused" in message:
                # Its words reach the log: one line, bounded (it runs the model's code).
                self.refused = " ".join(str(message["refused"]).split())[:500]
                self.refused_kind = str(message.get("kind", "failed"))[:32]
                culprit = message.get("module")
                if isinstance(culprit, str) and culprit.isidentifier():
                    self.refused_module = culprit
                self.retired = True
                if self.on_refused is not None:
                    self.on_refused(self)
            elif "exit" in message:
                future = self.children.pop(int(message["exit"]), None)
                if future is not None and not future.done():
                    future.set_result(int(message["status"]))
            else:
                self._replies.put_nowait(message)

    def _gone(self) -> None:
        """The pre-warmed process ended: its children died with it (PDEATHSIG)."""
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
        if self.children:
            log.warning(
                "the pre-warmed process for %s exited; the %d workers it forked die with it",
                self.label, len(self.children),
            )  # fmt: skip
        if not self.retired and self.refused is None and not self.forked:
            self.refused = "it exited before it forked a worker (its log lines above say why)"
            self.refused_kind = "exited"
            if self.on_refused is not None:
                self.on_refused(self)
        self.retired = True
        for future in self.children.values():
            if not future.done():
                future.set_result(-signal.SIGKILL)
        self.children.clear()
        self._replies.put_nowait({"error": "the pre-warmed process exited"})

    async def fork(
        self, argv: list[str], cwd: Path, env: dict[str, str], worker_fd: int, channel_fd: int
    ) -> ForkedProcess:
        """A stopped child running ``argv`` once continued; "{fd}" and "{fd_channel}" in it
        name its socket and its payload channel."""
        if not self.alive or self.sock is None:
            raise OSError("the pre-warmed process is not running")
        loop = asyncio.get_running_loop()
        log_read, log_write = os.pipe()
        try:
            async with self._lock:  # one fork at a time: replies come back in order
                message = json.dumps({"fork": {"argv": argv, "cwd": str(cwd), "env": env}})
                fds = array.array("i", [worker_fd, channel_fd, log_write])
                self.sock.sendmsg([message.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                reply = await asyncio.wait_for(self._replies.get(), 10)
        except BaseException:
            # A reply that comes later would be taken for the next fork's: this process is
            # not to be trusted with another fork. It goes, and the workers it forked with it.
            os.close(log_read)
            self.retired = True
            self.kill()
            raise
        finally:
            os.close(log_write)
        if "pid" not in reply:
            os.close(log_read)
            raise OSError(reply.get("error", "the pre-warmed process did not fork"))
        try:
            pid = self._own_child(reply["pid"])
        except OSError:
            os.close(log_read)
            self.retired = True  # it runs in the model's sandbox: it is not to be believed
            self.kill()
            raise
        exited: asyncio.Future[int] = loop.create_future()
        self.children[pid] = exited
        self.forked += 1
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(log_read, "rb", 0)
        )
        return ForkedProcess(pid, reader, exited)

    def _own_child(self, named: Any) -> int:
        """The pid the pre-warmed process names, if it really is a child of it, of its user.

        It runs inside the model's sandbox and its environment's code (``.pth`` files) runs in
        it: the runtime signals and moves only processes it has checked itself.
        """
        assert self.process is not None
        if not isinstance(named, int) or isinstance(named, bool) or named <= 1:
            raise OSError(f"the pre-warmed process named no pid ({named!r})")
        try:
            stat = Path(f"/proc/{named}/stat").read_text().rsplit(")", 1)[1].split()
            uid = _uid_of(named)
        except (OSError, IndexError, ValueError) as exc:
            raise OSError(f"the pre-warmed process named pid {named}, which is gone") from exc
        if int(stat[1]) != self.process.pid or uid != _uid_of(self.process.pid):
            raise OSError(
                f"the pre-warmed process named pid {named}, which is not a child of its own"
            )
        return named

    async def stopped(self, pid: int) -> bool:
        """Wait until the child has reached its SIGSTOP (it must not run before its cgroup)."""
        deadline = time.monotonic() + _STOP_WAIT
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return False
            if state == "T":
                return True
            await asyncio.sleep(0.0005)
        return False

    def memory_bytes(self) -> int:
        if self.process is None or self.process.returncode is not None:
            return 0
        try:
            with open(f"/proc/{self.process.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def retire(self) -> None:
        """Fork no more; exit once the workers it forked have ended."""
        self.retired = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(json.dumps({"retire": True}).encode())
        # (Still starting: start() sends it once it has a socket.)

    def kill(self) -> None:
        self.retired = True  # its end is ours, not a refusal
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Remove its cgroup once it has ended."""
        ended = self.process is None or self.process.returncode is not None
        if self.cgroup is not None and ended:
            self.cgroup.kill()
            self.cgroup.remove()
            self.cgroup = None


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError(f"no Uid line for pid {pid}")


def _entry_point_modules(package_dir: Path) -> set[str]:
    """Top-level modules the package's ``omni`` entry points name."""
    import tomllib

    try:
        project = tomllib.loads((package_dir / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return set()
    points = project.get("entry-points", {}).get("omni", {})
    if not isinstance(points, dict):
        return set()
    return {str(v).split(":")[0].split(".")[0].strip() for v in points.values()}


def trusted_modules(names: list[str], package_dir: Path) -> list[str]:
    """Of the modules a worker imported, in its order, those the runtime's environment provides.

    Only the base layer (what the operator installed beside the runtime) is imported ahead of
    the sandbox; a model's own modules and its environment's extra packages never are. A
    submodule (``transformers.models.bert.modeling_bert``) is kept when its top-level package
    is: whether the base layer really provides it, the pre-warmed process checks itself, since
    looking here would import its parents into the runtime.
    """
    import importlib.util

    roots = {str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix)}
    package = str(package_dir.resolve())
    own = _entry_point_modules(package_dir)  # installed beside the runtime or not: model code
    verdict: dict[str, bool] = {}

    def trusted(top: str) -> bool:
        if not top.isidentifier() or top in sys.builtin_module_names or top in own:
            return False
        if top.startswith("__"):  # __main__, __mp_main__: the worker itself
            return False
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return False
        origin = spec.origin if spec is not None else None
        if not origin or origin in ("built-in", "frozen"):
            return False
        where = str(Path(origin).resolve())
        return not where.startswith(package) and any(where.startswith(r) for r in roots)

    kept: list[str] = []
    seen: set[str] = set()
    for name in names[:MAX_MODULES]:  # (a worker runs the model's code: its list is bounded)
        top = name.partition(".")[0]
        if name in seen or len(name) > 200:
            continue
        if not all(part.isidentifier() for part in name.split(".")):
            continue
        if top not in verdict:
            if len(verdict) >= MAX_PACKAGES:
                continue
            verdict[top] = trusted(top)
        if verdict[top]:
            seen.add(name)
            kept.append(name)
    return kept
