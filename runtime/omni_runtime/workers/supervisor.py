"""Worker processes: spawn, handshake, watch, restart with backoff, drain and stop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from omni_runtime.config import ServerSettings
from omni_runtime.discovery import ModelSpec
from omni_runtime.isolation import CgroupError, Isolation, WorkerCgroup
from omni_runtime.isolation.plan import worker_environment
from omni_runtime.scheduler.backend import LoadFailed, Response, StartTimings, WorkerGone
from omni_runtime.scheduler.stats import ComputeStats
from omni_runtime.workers.channel import WorkerChannel
from omni_runtime.workers.output import relay_output
from omni_runtime.workers.prewarm import ForkedProcess, PrewarmedProcess
from omni_sdk.units import format_size
from omni_sdk.wire import Kind, Payloads

__all__ = ["WorkerProcess", "describe_exit"]

log = logging.getLogger("omni.supervisor")
_worker_ids = iter(range(1, 1 << 62))


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        names = {s.value: s.name for s in signal.Signals}
        return f"was killed by {names.get(-returncode, f'signal {-returncode}')}"
    return f"exited with status {returncode}"


class WorkerProcess:
    """One replica of one model: ``python -m omni_sdk.worker`` and its socket."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: ServerSettings,
        isolation: Isolation | None = None,
        prewarmed: PrewarmedProcess | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.isolation = isolation or Isolation()
        self.cgroup: WorkerCgroup | None = None
        self.oom_killed = False
        self.hung_after = 0.0  # set when the watchdog kills a worker that stopped answering
        self.id = next(_worker_ids)
        # Named by the runtime (inside its pid namespace every worker is pid 1), and not
        # guessable by another user who would plant a link or a file of that name first.
        self.gpu_region = (
            Path("/dev/shm") / f"omni-gpu-{os.getpid()}-{self.id}-{secrets.token_hex(8)}"
        )
        self.process: asyncio.subprocess.Process | ForkedProcess | None = None
        self.channel: WorkerChannel | None = None
        self.started_at = 0.0
        self.load_seconds = 0.0
        self.timings = StartTimings()
        self.aborted = False
        self.prewarmed = prewarmed
        self.forked = False  # started by a pre-warmed process rather than exec
        self.not_prewarmed = ""  # why not, when its model's pre-warmed process refused
        self.modules: list[str] = []  # the modules it imported, in order (HELLO says)
        self.log_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._log_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def label(self) -> str:
        return f"model '{self.spec.name}'"

    async def start(self) -> None:
        """Spawn the worker and wait for its HELLO; raise ``LoadFailed`` with the reason."""
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Large payloads' memfds travel on a second socket, each just before its frame.
        fds_parent, fds_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds_parent.setblocking(False)
        spec = self.spec
        command = [
            spec.python, "-m", "omni_sdk.worker",
            "--fd", str(child.fileno()),
            "--package", str(spec.package_dir),
            "--model", spec.name,
            f"--model-version={spec.version}",
            "--device", spec.device,
            "--resources", spec.resources.model_dump_json(),
            "--fd-channel", str(fds_child.fileno()),
            "--shm-threshold", str(self.settings.shm_threshold),
            "--max-tensor-elements", str(self.settings.max_tensor_elements),
        ]  # fmt: skip
        if spec.sequence is not None:
            command += ["--sequence", spec.sequence.model_dump_json()]
        environment = Path(spec.python).parent.parent if spec.python != sys.executable else None
        cache = self.isolation.cache_dir(spec.name)
        env = worker_environment(os.environ, spec.env, cache)
        if self.isolation.namespaces and spec.device.startswith("cuda"):
            # Its /dev/shm is private: the usage region lives in a directory bound into it,
            # made new by the runtime (mkdtemp: a fresh name, never an entry someone planted).
            prefix = f"omni-gpu-{os.getpid()}-{self.id}-"
            self.gpu_region = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")) / "usage"
        hooks = self._cuda_hooks_env()
        if self.isolation.cgroups is not None:
            try:
                self.cgroup = self.isolation.cgroups.create(f"worker-{self.id}", spec.resources)
            except (CgroupError, OSError) as exc:
                log.warning("%s: runs without a cgroup: %s", self.label, exc)
        try:
            launcher = self.isolation.launcher(
                model=spec.name,
                package=spec.package_dir,
                environment=environment,
                memory_limit=spec.resources.memory,
                network=spec.network == "host",
                cgroup=self.cgroup,
                keep_fds=(child.fileno(), fds_child.fileno()),
                writable=(self.gpu_region.parent,) if hooks else (),
                setenv=hooks,
            )
        except OSError as exc:  # its cache quota could not be set up
            for sock in (parent, child, fds_parent, fds_child):
                sock.close()
            self.cleanup()
            raise LoadFailed(f"{self.label}: {exc}") from exc
        if not launcher:
            env.update(hooks)
        self.started_at = time.monotonic()
        if self.prewarmed is not None and not hooks:
            # libomnicuda must be preloaded at exec with the model's quota: CUDA workers start
            # fresh. Anything that goes wrong with a fork falls back to a fresh start.
            try:
                await self._fork(command, env, child, fds_child)
            except OSError as exc:
                log.warning("%s: no pre-warmed start (%s); starting it fresh", self.label, exc)
                self.process = None
        try:
            if self.process is None:
                self.process = await asyncio.create_subprocess_exec(
                    *launcher,
                    *command,
                    pass_fds=(child.fileno(), fds_child.fileno()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=spec.package_dir,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            parent.close()
            fds_parent.close()
            self.cleanup()
            raise LoadFailed(f"{self.label}: cannot start {spec.python}: {exc}") from exc
        finally:
            child.close()
            fds_child.close()
        if self.aborted:  # stopped while it was being spawned
            self.kill()
        if self.cgroup is not None and not self.forked and not launcher:
            # (The sandbox joins it before anything runs; a fork joined it while stopped.)
            try:
                self.cgroup.add(self.process.pid)
            except CgroupError as exc:
                log.warning("%s: runs without a cgroup: %s", self.label, exc)
        self._log_task = asyncio.create_task(self._pump_logs())
        payloads = Payloads(fds_parent, self.settings.shm_threshold)
        polls = spec.resources.cpus >= 1  # (under a core: polling would use up its CPU quota)
        _, self.channel = await loop.create_unix_connection(
            lambda: WorkerChannel(self.label, payloads, fds_parent, self.settings.busy_poll, polls),
            sock=parent,
        )
        timeout = self.settings.load_timeout
        try:
            kind, hello = await asyncio.wait_for(asyncio.shield(self.channel.hello), timeout)
        except WorkerGone:
            returncode = await self.wait()
            tail = " | ".join(list(self.log_tail)[-5:])
            raise LoadFailed(
                f"{self.label}: worker {self.exit_reason(returncode)} before it was ready"
                + (f"; its last output: {tail}" if tail else "")
            ) from None
        except TimeoutError:
            self.kill()
            await self.wait()
            raise LoadFailed(
                f"{self.label}: not ready after {timeout:.0f}s (server.load_timeout); killed it"
            ) from None
        if kind == Kind.LOAD_FAILED:
            await self.stop(timeout=5)
            raise LoadFailed(str(hello.get("error", f"{self.label} failed to load")))
        self.load_seconds = time.monotonic() - self.started_at
        self.timings = StartTimings.from_hello(hello, self.started_at, self.load_seconds)
        modules = hello.get("modules")
        if isinstance(modules, list):
            inherited = hello.get("modules_inherited")
            if self.forked and isinstance(inherited, int) and not isinstance(inherited, bool):
                # What its pre-warmed process had is not news: only what it imported since.
                modules = modules[max(0, inherited) :]
            self.modules = [m for m in modules if isinstance(m, str)]

    async def _fork(
        self, command: list[str], env: dict[str, str], child: socket.socket, fds: socket.socket
    ) -> None:
        """Fork the worker from the pre-warmed process; it joins its cgroup while stopped."""
        assert self.prewarmed is not None
        argv = command[3:]  # what follows "python -m omni_sdk.worker"
        argv[argv.index("--fd") + 1] = "{fd}"
        argv[argv.index("--fd-channel") + 1] = "{fd_channel}"
        process = await self.prewarmed.fork(
            argv, self.spec.package_dir, env, child.fileno(), fds.fileno()
        )
        try:
            if not await self.prewarmed.stopped(process.pid):
                raise OSError(f"the fork (pid {process.pid}) never reached its SIGSTOP")
            if self.cgroup is not None:
                self.cgroup.add(process.pid)  # before it runs a single line of its own
            os.kill(process.pid, signal.SIGCONT)
        except (OSError, CgroupError) as exc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signal.SIGKILL)  # before its setsid, it has no group
            raise OSError(str(exc)) from exc
        self.process = process
        self.forked = True

    async def _pump_logs(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        await relay_output(self.process.stdout, self.spec.name, self.log_tail)

    async def wait(self) -> int:
        assert self.process is not None
        returncode = await self.process.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        self.cleanup()
        return returncode

    async def stop(self, timeout: float) -> None:
        """Ask the worker to finish and exit; kill it if it has not within ``timeout``."""
        if self.process is None or self.process.returncode is not None:
            self.cleanup()
            return
        if self.channel is not None:
            self.channel.send(Kind.SHUTDOWN)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            log.warning(
                "%s: worker pid %s did not stop in %.0fs; killing it", self.label, self.pid, timeout
            )
            self.kill()
            await self.process.wait()
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.close()
        self.cleanup()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def request(
        self, kind: int, parts: list[bytes], on_chunk: Callable[[bytes], None] | None = None
    ) -> asyncio.Future[Response]:
        """Send one request over its socket; the future resolves with the answer."""
        channel = self.channel
        if channel is None:
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            future.set_exception(WorkerGone(f"{self.label}: its worker is not connected"))
            return future
        return channel.request(kind, parts, on_chunk)

    def count_compute(self, stats: ComputeStats) -> None:
        """From now on, add the compute times its answers carry to ``stats``."""
        if self.channel is not None:
            self.channel.compute = stats

    def abandon(self, future: asyncio.Future[Response]) -> asyncio.Future[Response]:
        """CANCEL a request whose caller left; the returned future ends with its answer."""
        if self.channel is None:
            return future
        return self.channel.abandon(future)

    async def park(self) -> None:
        """Move its GPU memory to the host (a PREFETCH the worker runs between requests)."""
        self.prefetch("host")

    async def wake(self) -> None:
        """Bring its GPU memory back, and wait until the worker has (PREFETCH, then a PING)."""
        self.prefetch("device")
        if self.channel is not None and self.spec.device.startswith("cuda"):
            with contextlib.suppress(WorkerGone, TimeoutError):
                await asyncio.wait_for(self.channel.roundtrip(), self.settings.heartbeat_timeout)

    def prefetch(self, where: str) -> None:
        """Ask the worker to move its GPU memory to ``"device"`` or ``"host"`` (CUDA only)."""
        if self.channel is not None and self.spec.device.startswith("cuda"):
            self.channel.send(Kind.PREFETCH, where.encode())

    def abort(self) -> None:
        """Stop a worker that may still be starting: its ``start`` fails with ``LoadFailed``."""
        self.aborted = True
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (its session and its cgroup)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # it leads its own session
        if self.cgroup is not None:
            self.cgroup.kill()

    def _cuda_hooks_env(self) -> dict[str, str]:
        """On a GPU, libomnicuda preloaded into this worker alone, with its quota and mode."""
        if not self.spec.device.startswith("cuda"):
            return {}
        try:
            import omni_cstub
        except ImportError:
            log.warning("%s: omni-cstub is missing, so GPU memory is not limited", self.label)
            return {}
        quota = self.spec.resources.gpu_memory or None
        region = str(self.gpu_region) if self.gpu_region.name == "usage" else self.gpu_region.name
        if os.environ.get("OMNI_CUDA_MODE") == "device":
            return omni_cstub.preload_env(quota, mode="device", shm_name=region)
        return omni_cstub.preload_env(quota, mode="managed", shm_name=region)

    def gpu_memory_bytes(self) -> int:
        """GPU memory the worker holds through libomnicuda (its shared region), else 0."""
        if self.pid is None or not self.spec.device.startswith("cuda"):
            return 0
        try:
            import omni_cstub

            return int(omni_cstub.read_usage(self.gpu_region).used)
        except (ImportError, OSError, ValueError):
            return 0

    def exit_reason(self, returncode: int | None) -> str:
        """How the worker ended, in words: "exceeded its memory limit of 2 GiB", say."""
        if self.hung_after:
            return (
                f"stopped answering for {self.hung_after:.0f}s (server.heartbeat_timeout) "
                "and was killed"
            )
        oom = self.oom_killed or (self.cgroup is not None and self.cgroup.oom_killed())
        if returncode == -signal.SIGKILL and oom:
            limit = format_size(self.spec.resources.memory)
            return f"exceeded its memory limit of {limit} and was killed by the kernel"
        return describe_exit(returncode)

    def memory_bytes(self) -> int:
        """Memory charged to the worker: its cgroup's usage, else its resident set."""
        if self.cgroup is not None:
            used = self.cgroup.memory_bytes()
            if used:
                return used
        return _rss(self.pid) if self.pid else 0

    def cleanup(self) -> None:
        """Remove what the worker leaves behind: its processes, GPU region and cgroup."""
        exited = self.process is None or self.process.returncode is not None
        if exited and self.pid is not None:
            self.kill()  # whatever it started and left behind
        if exited and self.pid is not None and self.spec.device.startswith("cuda"):
            if self.gpu_region.name == "usage":  # its directory, and whatever it left there
                shutil.rmtree(self.gpu_region.parent, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    self.gpu_region.unlink()
        if self.cgroup is not None and exited:
            self.oom_killed = self.oom_killed or self.cgroup.oom_killed()
            self.cgroup.remove()


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
