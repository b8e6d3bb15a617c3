"""Service processes forked from one process that has imported every service already.

A service started as ``python -m zmta_<name>`` spends about half a CPU-second importing
its libraries before it does anything; a deployment of six services, two seconds on a
2-core machine. The test suite starts about a hundred deployments, so it forks them
instead, from a fork server (``python -m zmta_devtools.forking``) that imported every
service's ``__main__`` module once. Each service is still a process of its own, with its
own signals, memory, metrics and log file, and runs the same command-line entry point
(``cli``) with the same arguments, environment and working directory; only the imports
are shared.

Why not :mod:`multiprocessing`'s fork server: every child it forks first re-imports the
parent's main script (pytest's, here), which costs what forking was meant to save.

The server is single-threaded (a fork from a process with other threads can inherit a
lock some thread held): it waits on its requests and on a pipe that SIGCHLD writes to,
and answers on its stdout, one JSON object a line: ``{"started": request, "pid": n}``,
``{"exited": pid, "code": n}`` (``-signal`` when a signal ended it, as :mod:`subprocess`
reports it). :class:`ForkedProcess` answers like the :class:`subprocess.Popen` it
replaces, so that code handling service processes does not care how they were started.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any

SERVICES = ("zmta_ingest", "zmta_queue", "zmta_sender", "zmta_bounce", "zmta_api")


class ForkServer:
    """The parent's side: one fork server process, and what it said of its children."""

    def __init__(self) -> None:
        self._server = subprocess.Popen(
            [sys.executable, "-m", "zmta_devtools.forking"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._requests = itertools.count()
        self._changed = threading.Condition()
        self._pids: dict[int, int] = {}  # request -> pid
        self._codes: dict[int, int] = {}  # pid -> exit code
        threading.Thread(target=self._read, name="fork-server", daemon=True).start()

    def _read(self) -> None:
        assert self._server.stdout is not None
        for line in self._server.stdout:
            answer = json.loads(line)
            with self._changed:
                if "started" in answer:
                    self._pids[answer["started"]] = answer["pid"]
                else:
                    self._codes[answer["exited"]] = answer["code"]
                self._changed.notify_all()

    def fork(self, module: str, argv: list[str], log_path: str | None) -> int:
        """Start a service; its pid."""
        request = next(self._requests)
        order = {"request": request, "module": module, "argv": argv, "log": log_path}
        order |= {"env": {**os.environ, "PYTHONUNBUFFERED": "1"}, "cwd": os.getcwd()}
        assert self._server.stdin is not None
        with self._changed:
            self._server.stdin.write(json.dumps(order).encode() + b"\n")
            self._server.stdin.flush()
            if not self._changed.wait_for(lambda: request in self._pids, timeout=30):
                raise RuntimeError(f"the fork server did not start {module}")
            return self._pids.pop(request)

    def code(self, pid: int, timeout: float | None = 0) -> int | None:
        """The exit code of ``pid``, waiting up to ``timeout`` seconds (None: for ever)."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._codes, timeout=timeout)
            return self._codes.get(pid)


_server: ForkServer | None = None
_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """This process's fork server, started at first use."""
    global _server
    with _server_lock:
        if _server is None:
            _server = ForkServer()
        return _server


class ForkedProcess:
    """A service forked from the fork server, handled like a :class:`subprocess.Popen`."""

    def __init__(self, module: str, argv: list[str], log_path: str | None) -> None:
        self.args = [sys.executable, "-m", module, *argv]
        self._server = fork_server()
        self.pid = self._server.fork(module, argv, log_path)

    @property
    def returncode(self) -> int | None:
        return self._server.code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.code(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# -- the fork server itself ---------------------------------------------------------


def _answer(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def _child(order: dict[str, Any]) -> int:
    """In the forked child: the caller's environment and working directory, the output
    to the log, then the service's command line as ``python -m`` runs it; its exit code."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(order["cwd"])
    os.environ.clear()
    os.environ.update(order["env"])
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if order["log"] else devnull
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        entry = importlib.import_module(f"{order['module']}.__main__")
        entry.cli(args=order["argv"], prog_name=f"python -m {order['module']}")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _answer({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def serve() -> None:
    """Import the services, then fork one for each request on stdin until it closes."""
    for service in SERVICES:
        importlib.import_module(f"{service}.__main__")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD wakes us
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "orders")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    pending = b""  # orders read but not yet whole (stdin is read raw: select sees no buffer)
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                _reap()
                continue
            data = os.read(0, 65536)
            if not data:
                return  # the parent is gone; the services it started go on until stopped
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                _start(json.loads(line))


def _start(order: dict[str, Any]) -> None:
    pid = os.fork()
    if pid == 0:
        code = _child(order)
        logging.shutdown()  # what the interpreter's exit would do: flush the log handlers
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    _answer({"started": order["request"], "pid": pid})


if __name__ == "__main__":
    serve()
