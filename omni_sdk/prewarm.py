"""``python -m omni_sdk.prewarm``: a pre-warmed process that forks workers on the runtime's word.

The runtime keeps one per model environment that has recently served. It imports what a worker
needs (``omni_sdk.worker``, pydantic) and what the environment's models imported before, as far
as the runtime's own base layer provides it, then waits. Asked for a worker, it forks; the child
starts a session of its own, takes the worker's socket and log pipe, stops itself (SIGSTOP) until
the runtime has put it in its cgroup and continued it, and then runs exactly what
``python -m omni_sdk.worker`` runs: the sandbox first, then the model. No model code runs here.

Control messages are JSON over a SOCK_SEQPACKET socket (``--fd``):

    runtime -> here: {"fork": {"argv": [...], "cwd": str, "env": {...}}}
                     + 3 fds (socket, payload channel, log)
    here -> runtime: {"pid": int}                 the child, stopped until the runtime continues it
    here -> runtime: {"exit": pid, "status": int} a child ended (negative: killed by that signal)
    here -> runtime: {"refused": str}             it will not pre-warm (why), and exits
    runtime -> here: {"retire": true}             exit once no child is left

The modules to preload come on standard input, one per line, in the order the model's earlier
worker imported them (``--preload -``), or as a comma-separated list.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import selectors
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import omni_sdk.worker

_PR_SET_PDEATHSIG = 1
_MAX_MESSAGE = 1 << 20


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    message, ancillary, _, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if not message:
        return None, list(fds)
    return json.loads(message), list(fds)


def _child(
    request: dict[str, Any], worker_fd: int, channel_fd: int, log_fd: int, control: socket.socket
) -> NoReturn:
    """The forked worker: its own session, its log, stopped until the runtime has placed it."""
    code = 1
    try:
        control.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        for stream in (sys.stdout, sys.stderr):  # as PYTHONUNBUFFERED makes them for a fresh one
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["OMNI_WORKER_PID"] = str(os.getpid())  # no pid namespace of its own
        os.chdir(request["cwd"])
        # As `python -m omni_sdk.worker` in the package directory would be set up: its path,
        # argv and SIGINT, and no descriptor but the standard ones and its socket.
        if sys.flags.safe_path:  # started with -P: nothing of ours to replace
            sys.path.insert(0, request["cwd"])
        else:
            sys.path[0] = request["cwd"]
        names = {"{fd}": str(worker_fd), "{fd_channel}": str(channel_fd)}
        argv = [names.get(a, a) for a in request["argv"]]
        sys.argv = [omni_sdk.worker.__file__, *argv]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        start = 3
        for fd in sorted((worker_fd, channel_fd)):
            os.closerange(start, fd)
            start = fd + 1
        os.closerange(start, 1 << 16)
        os.kill(os.getpid(), signal.SIGSTOP)  # the runtime moves us into our cgroup, then SIGCONT
        code = omni_sdk.worker.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(control: socket.socket) -> int:
    children: set[int] = set()
    retiring = False
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "control")
    selector.register(wake_read, selectors.EVENT_READ, "wake")

    def send(message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            control.send(json.dumps(message).encode())

    while True:
        for key, _ in selector.select():
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    wake_read.recv(4096)
                while True:  # reap every child that ended, and say how
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    children.discard(pid)
                    send({"exit": pid, "status": os.waitstatus_to_exitcode(status)})
                continue
            request, fds = _receive(control)
            if request is None:
                return 0  # the runtime went away; our children die with us (PDEATHSIG)
            if request.get("retire"):
                retiring = True
            elif "fork" in request and len(fds) == 3:
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    wake_read.close()
                    wake_write.close()
                    _child(request["fork"], fds[0], fds[1], fds[2], control)
                children.add(pid)
                send({"pid": pid})
            for fd in fds:
                os.close(fd)
        if retiring and not children:
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_sdk.prewarm")
    parser.add_argument("--fd", type=int, required=True, help="the control socket")
    parser.add_argument(
        "--preload",
        default="",
        help="modules to import ahead, comma-separated, or - to read them from stdin, one a line",
    )
    parser.add_argument(
        "--trusted",
        action="append",
        default=[],
        help="a directory preloaded modules must come from (the runtime's base layer)",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trusted = [os.path.realpath(t) for t in args.trusted]
    control = socket.socket(fileno=args.fd)
    names = sys.stdin.read().split() if args.preload == "-" else args.preload.split(",")
    try:
        _preload(filter(None, names), trusted)
        _single_threaded()
    except Refused as exc:
        # Said to the runtime (a warning and a metric there), and on stderr for its log.
        print(f"omni prewarm: not pre-warming: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            refusal = {"refused": str(exc), "kind": exc.kind, "module": exc.module}
            control.send(json.dumps(refusal).encode())
        return 0
    return serve(control)


class Refused(Exception):
    """Why this process will not fork workers; ``kind`` is the metric's reason label, and
    ``module`` the package to leave out next time, where one is to blame."""

    def __init__(self, kind: str, message: str, module: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.module = module


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _fork_safe_threads() -> int:
    """Threads of native pools that a fork is known to survive.

    OpenBLAS built on pthreads (numpy's and scipy's wheels) stops its pool in a
    ``pthread_atfork`` handler and starts it again in the child when it is next used; its pool
    holds ``num_threads - 1`` threads. threadpoolctl (from the base layer, when it is there)
    names the pools that are loaded. Anything else (an OpenMP pool, a framework's own thread) is
    not assumed to survive.
    """
    try:
        import threadpoolctl
    except ImportError:
        return 0
    try:
        pools = threadpoolctl.threadpool_info()
    except Exception:
        return 0
    return sum(
        max(0, int(pool.get("num_threads", 1)) - 1)
        for pool in pools
        if pool.get("internal_api") == "openblas" and pool.get("threading_layer") == "pthreads"
    )


def _thread_names() -> list[str]:
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if names:
        return names
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            if int(task) != os.getpid():
                with open(f"/proc/self/task/{task}/comm") as comm:
                    names.append(comm.read().strip())
    return names


def _single_threaded(last: str = "") -> None:
    """A fork carries only the thread that forks: a preloaded module must not have started one
    (a lock another thread held at the fork would stay locked in the child forever)."""
    count = _threads()
    if count <= 1 or count - 1 <= _fork_safe_threads():
        return
    names = ", ".join(_thread_names()) or "native"
    culprit = last.partition(".")[0]
    raise Refused(
        "threads",
        f"importing {last or 'its modules'} started a thread ({names}) that a fork cannot carry",
        module=culprit,
    )


def _preload(names: Iterable[str], trusted: list[str]) -> None:
    """Import ``names`` with only the trusted layer importable, and nothing else after all.

    While preloading, ``sys.path`` holds only the trusted directories, so whatever a preloaded
    module imports in turn (an optional extra, say) cannot come from the model's environment.
    A module that would pull anything from elsewhere is simply not preloaded.
    """

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == t or real.startswith(t + os.sep) for t in trusted)

    saved = list(sys.path)
    sys.path[:] = [p for p in saved if p and inside(p)]
    importlib.invalidate_caches()
    try:
        with warnings.catch_warnings():  # a deprecation notice is the worker's to show
            warnings.simplefilter("ignore")
            _import_trusted(names, inside)
    finally:
        sys.path[:] = saved
        importlib.invalidate_caches()


# Caches a framework fills the first time it is used in a process, which a fork inherits when
# they are filled here: (module, function, arguments). Only a function of a module that is
# already preloaded is called, with these fixed arguments: the base layer's own code, nothing of
# the model's.
FRAMEWORK_WARMUPS: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    # transformers 5 compiles about a thousand regular expressions (its checkpoint conversion
    # table) in the first from_pretrained of a process: half a second.
    ("transformers.conversion_mapping", "get_checkpoint_conversion_mapping", ("bert",)),
)


def _warm_framework_caches() -> list[str]:
    warmed = []
    for module_name, function, args in FRAMEWORK_WARMUPS:
        module = sys.modules.get(module_name)
        call = getattr(module, function, None) if module is not None else None
        if not callable(call):
            continue
        try:
            call(*args)
        except Exception:  # another version of the framework: its worker fills it
            continue
        warmed.append(f"{module_name}.{function}")
    return warmed


def _import_trusted(names: Iterable[str], inside: Callable[[str], bool]) -> None:
    before = set(sys.modules)
    already = {id(module) for module in sys.modules.values()}
    skipped: list[str] = []
    threads = _threads()
    for name in names:
        if name in sys.modules:
            continue
        # Only what this interpreter would take from the base layer: a module the model's own
        # environment provides (another version, say) is its code, imported after the sandbox.
        # (find_spec of a submodule imports its parents, from the base layer alone: sys.path
        # holds nothing else now.)
        try:
            spec = importlib.util.find_spec(name)
            if not (spec and spec.origin and inside(spec.origin)):
                continue
            importlib.import_module(name)
        except Exception:  # a module that will not preload is imported by the worker
            skipped.append(name)
        if _threads() > threads:  # (checked only when the count moves: threadpoolctl is slow)
            _single_threaded(last=name)
            threads = _threads()
    _warm_framework_caches()
    if _threads() > threads:
        _single_threaded(last="its framework warm-ups")
    if skipped:
        print(
            f"omni prewarm: {len(skipped)} module(s) left to the worker, e.g. {skipped[0]}",
            file=sys.stderr,
        )
    for name in set(sys.modules) - before:
        if id(sys.modules[name]) in already:
            continue  # another name for a module that was there before (__mp_main__)
        origin = _origin(sys.modules[name])
        if origin and not inside(origin):
            # Something came from outside the trusted layer after all: serve nothing.
            raise Refused("outside_base", f"{name} was imported from {origin}")


def _origin(module: object) -> str | None:
    """The file a module's code was read from, or None for one built by code in memory.

    Frameworks make module objects of their own (torch.ops, torch.classes, the aliases of
    ``__main__`` that multiprocessing makes): their code ran from their parent package, which
    is checked itself. Their ``__file__`` is a bare name, or nothing.
    """
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) if getattr(spec, "has_location", False) else None
    if not isinstance(origin, str) or not os.path.isabs(origin):
        origin = getattr(module, "__file__", None)
    if not isinstance(origin, str) or not os.path.isabs(origin):
        return None
    return origin


if __name__ == "__main__":
    sys.exit(main())
