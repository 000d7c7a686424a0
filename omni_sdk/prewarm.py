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
    runtime -> here: {"retire": true}             exit once no child is left
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
    parser.add_argument("--preload", default="", help="modules to import ahead, comma-separated")
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
    _preload(filter(None, args.preload.split(",")), trusted)
    control = socket.socket(fileno=args.fd)
    return serve(control)


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
        _import_trusted(names, inside)
    finally:
        sys.path[:] = saved
        importlib.invalidate_caches()


def _import_trusted(names: Iterable[str], inside: Callable[[str], bool]) -> None:
    before = set(sys.modules)
    for name in names:
        # Only what this interpreter would take from the base layer: a module the model's own
        # environment provides (another version, say) is its code, imported after the sandbox.
        try:
            spec = importlib.util.find_spec(name)
            if not (spec and spec.origin and inside(spec.origin)):
                continue
            importlib.import_module(name)
        except Exception as exc:  # a module that will not preload is imported by the worker
            print(f"omni prewarm: could not preload {name}: {exc}", file=sys.stderr)
    for name in set(sys.modules) - before:
        origin = getattr(sys.modules[name], "__file__", None)
        if origin and not inside(origin):
            # Something came from outside the trusted layer after all: serve nothing.
            raise SystemExit(f"omni prewarm: {name} was imported from {origin}; not pre-warming")


if __name__ == "__main__":
    sys.exit(main())
