"""The five services as real processes, started from one config file.

Used by the tests, the benchmark and ``make run``: each service runs as
``python -m zmta_<name> --config FILE`` in its own process, and is ready when its
port answers (SMTP and API ports; the others' /metrics port). The tests fork the
processes from a fork server with the services imported (:mod:`.forking`) instead of
starting interpreters: the same command lines, without the imports' start-up time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zmta_common.config import Config

from .forking import ForkedProcess
from .servers import ServerError, free_port, wait_for_port


@dataclass
class ServiceProcess:
    name: str
    command: list[str]
    ready_port: int
    log_path: Path | None = None
    fork: bool = False  # from the fork server (see :mod:`.forking`), not a new interpreter
    proc: subprocess.Popen[bytes] | ForkedProcess | None = None

    def start(self) -> None:
        if self.fork:
            module, argv = self.command[2], self.command[3:]  # [python, -m, module, *argv]
            self.proc = ForkedProcess(module, argv, str(self.log_path) if self.log_path else None)
            return
        out = self.log_path.open("ab") if self.log_path else None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.command, stdout=out, stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL, env=env
        )
        if out is not None:
            out.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wait_for_port("127.0.0.1", self.ready_port, timeout, self.proc)
        except ServerError as exc:
            raise ServerError(f"{self.name}: {exc}\n{self.tail_log()}") from None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        self.terminate()
        return self.wait(timeout)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the exit, SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail_log(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class System:
    """ingest, queue, bounce, api and the senders of the zones, for one config file."""

    config_path: Path
    config: Config
    log_dir: Path | None  # None: the services log to our own stderr
    fork: bool = False  # fork the services from a fork server (the tests), not ``python -m``
    processes: list[ServiceProcess] = field(default_factory=list)

    def _spawn(self, name: str, module: str, ready_port: int, *extra: str) -> ServiceProcess:
        command = [sys.executable, "-m", module, "--config", str(self.config_path), *extra]
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        process = ServiceProcess(name, command, ready_port, log_path, self.fork)
        process.start()
        self.processes.append(process)
        return process

    def start(self, senders: dict[str, int] | None = None, with_api: bool = True, ingest: int = 1) -> None:
        """Start every service; ``senders`` maps zone -> number of sender processes (default 1 each);
        ``ingest`` processes share the SMTP ports (named ``ingest-0``... when more than one)."""
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        # All at once: the store's migrations take an advisory lock, so the first service to
        # connect creates the schema and the others wait for it.
        started = [self._spawn("queue", "zmta_queue", self.config.metrics.queue_port)]
        started.append(self._spawn("bounce", "zmta_bounce", self.config.metrics.bounce_port))
        counts = senders if senders is not None else {zone: 1 for zone in self.config.zones}
        for zone, count in counts.items():
            for _ in range(count):
                started.append(self.start_sender(zone, wait=False))
        feeder = next(i for i in self.config.smtp_interfaces.values() if i.enabled)
        if ingest == 1:
            started.append(self._spawn("ingest", "zmta_ingest", feeder.port))
        for index in range(ingest if ingest > 1 else 0):
            port = free_port()  # ready when its metrics answer: the SMTP port is shared
            extra = ("--reuse-port", "--metrics-port", str(port))
            started.append(self._spawn(f"ingest-{index}", "zmta_ingest", port, *extra))
        if with_api:
            started.append(self._spawn("api", "zmta_api", self.config.api.port))
        for process in started:
            process.wait_ready()

    def start_sender(self, zone: str, wait: bool = True, *extra: str) -> ServiceProcess:
        """One more sender process for ``zone``; ``extra`` goes on its command line (``--slice 1/2``)."""
        port = free_port()
        index = sum(1 for p in self.processes if p.name.startswith(f"sender-{zone}-"))
        name = f"sender-{zone}-{index}"
        process = self._spawn(name, "zmta_sender", port, "--zone", zone, "--metrics-port", str(port), *extra)
        if wait:
            process.wait_ready()
        return process

    def get(self, name: str) -> ServiceProcess:
        return next(p for p in self.processes if p.name == name)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to every service at once (each stops on its own), then wait for all."""
        for process in self.processes:
            process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.wait(max(0.1, deadline - time.monotonic()))
        self.processes.clear()

    def check(self) -> str | None:
        """The name of a service that has exited, if any."""
        return next((p.name for p in self.processes if not p.alive), None)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail_log()}" for p in self.processes)
