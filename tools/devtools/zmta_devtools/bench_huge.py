"""``python -m zmta_devtools.bench_huge``: one huge message through the whole system, with
the memory of every service watched, and through Postfix on the same machine.

It starts the services on a fresh PostgreSQL, Redis and NATS with Postfix's
``smtp-sink`` as the smarthost, sends one message of ``--size`` MiB (1 GiB by default)
over SMTP, waits until the sink has it, and prints for each service its resident
memory when idle, its peak while the message passed, and the growth. Every service
should stay within a few tens of MB of idle, whatever the message's size. Then the same
message goes through a private Postfix (``message_size_limit`` lifted) to the same kind
of sink, and both relays' intake and end-to-end times are printed with their ratios.
Our PostgreSQL is durable (fsync on), as Postfix syncs its queue files.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import psutil
import typer
import yaml

from zmta_common.config import load_config

from .bench import SmtpSink, postfix_relay
from .servers import NatsServer, PostgresCluster, RedisServer, free_port
from .system import System

MIB = 1024 * 1024
LINE = b"The quick brown fox jumps over the lazy dog, again and again and again...\r\n"
BLOCK = LINE * (MIB // len(LINE))

cli = typer.Typer(add_completion=False)


class Watcher:
    """Samples the RSS of some processes every 50 ms and keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.idle = {name: p.memory_info().rss for name, p in self.processes.items()}
        self.cpu_start = {name: _cpu(p) for name, p in self.processes.items()}
        self.cpu: dict[str, float] = {}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, process in self.processes.items():
                self.peak[name] = max(self.peak[name], process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = {name: _cpu(p) - self.cpu_start[name] for name, p in self.processes.items()}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _reply(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        data += conn.recv(4096)
    return data.decode().strip()


def send(port: int, mib: int) -> str:
    """One message of ``mib`` MiB of body, streamed; returns the final reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as conn:
        _reply(conn)
        for command in (b"EHLO bench.test", b"MAIL FROM:<huge@origin.test>", b"RCPT TO:<rcpt@destination.test>"):
            conn.sendall(command + b"\r\n")
            _reply(conn)
        conn.sendall(b"DATA\r\n")
        _reply(conn)
        conn.sendall(b"From: huge@origin.test\r\nSubject: huge\r\n\r\n")
        for _ in range(mib):
            conn.sendall(BLOCK)
        conn.sendall(b".\r\n")
        return _reply(conn)


def write_config(
    path: Path, postgres: PostgresCluster, redis: RedisServer, nats: NatsServer, sink: int, mib: int
) -> None:
    config = {
        "log_level": "WARNING",
        "dbs": {"postgres": postgres.url, "redis": redis.url, "nats": nats.url},
        "smtp_interfaces": {"feeder": {"port": free_port(), "max_size": (mib + 16) * MIB}},
        "api": {"port": free_port()},
        "metrics": {name: free_port() for name in ("ingest_port", "queue_port", "sender_port", "bounce_port")},
        "zones": {"default": {"smarthost": f"127.0.0.1:{sink}"}, "bounces": {}},
    }
    path.write_text(yaml.safe_dump(config))


@cli.command()
def main(size: Annotated[int, typer.Option("--size", help="message body in MiB")] = 1024) -> None:
    """Send one huge message through the system and report every service's peak memory."""
    workdir = Path(tempfile.mkdtemp(prefix="zmta-huge-"))
    workdir.chmod(0o755)
    servers = [
        PostgresCluster(workdir / "pg", durable=True),
        RedisServer(workdir / "redis"),
        NatsServer(workdir / "nats"),
    ]
    postgres, redis, nats = servers
    sink = system = None
    try:
        for server in servers:
            server.start()
        sink = SmtpSink(free_port())
        config_path = workdir / "zmta.yaml"
        write_config(config_path, postgres, redis, nats, sink.port, size)  # type: ignore[arg-type]
        config = load_config(config_path)
        system = System(config_path, config, workdir / "logs")
        system.start({"default": 1})
        time.sleep(2)  # let every service finish starting up before measuring "idle"
        watcher = Watcher({p.name: p.proc.pid for p in system.processes if p.proc is not None})
        start = time.monotonic()
        reply = send(config.smtp_interfaces["feeder"].port, size)
        intake = time.monotonic() - start
        done = sink.wait_for(1, timeout=1800)
        watcher.stop()
        ours = (intake, done - start)
        print(f"zonemta-py: {size} MiB; intake {intake:.1f} s ({reply}); delivered after {done - start:.1f} s")
        print(f"{'service':<18} {'idle MB':>8} {'peak MB':>8} {'growth MB':>10} {'CPU s':>7}")
        for name in watcher.processes:
            idle, peak = watcher.idle[name] / MIB, watcher.peak[name] / MIB
            print(f"{name:<18} {idle:>8.1f} {peak:>8.1f} {peak - idle:>10.1f} {watcher.cpu[name]:>7.2f}")
        system.stop()
        system = None
        theirs = run_postfix(workdir, size)
        print(
            f"speed ratio ours/postfix (Postfix's time over ours; 1.0 is as fast): intake"
            f" {theirs[0] / ours[0]:.2f}, end-to-end {theirs[1] / ours[1]:.2f}"
        )
    finally:
        if system is not None:
            system.stop()
        if sink is not None:
            sink.stop()
        for server in reversed(servers):
            server.stop()
        if not os.environ.get("ZMTA_BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def run_postfix(workdir: Path, size: int) -> tuple[float, float]:
    """The same message through Postfix: (intake seconds, end-to-end seconds)."""
    with postfix_relay(workdir, "message_size_limit = 0\n") as (port, sink, _):
        start = time.monotonic()
        reply = send(port, size)
        intake = time.monotonic() - start
        done = sink.wait_for(1, timeout=1800) - start
    print(f"postfix:    {size} MiB; intake {intake:.1f} s ({reply}); delivered after {done:.1f} s")
    return intake, done


if __name__ == "__main__":
    cli()
