"""``make bench``: our relay against Postfix on the same machine, same load, same sink.

For each of the two relays: start Postfix's ``smtp-sink`` as the next hop, start
the relay (ours: the five services on a fresh, durable PostgreSQL, Redis and
NATS; Postfix: a private instance relaying to the sink), push N messages of
S bytes with ``smtp-source`` over C sessions, and time

* intake: from the first connection until smtp-source has its last 250;
* end to end: from the first connection until the sink has counted all N.

and the CPU both used: ours per process (and PostgreSQL with its backends, and NATS);
Postfix's as its master's own CPU time plus that of its children, those that have exited
included (the kernel adds an exited child's time to its parent's ``children`` times).

The machines are shared and noisy, so the two relays run alternately ``--runs`` times
(three by default); every run is printed, then the medians and their ratios.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import psutil
import typer
import yaml

from zmta_common.config import load_config

from . import sizing
from .servers import NatsServer, PostgresCluster, RedisServer, find_binary, free_port, wait_for_port
from .sizing import Sizing
from .system import System

cli = typer.Typer(add_completion=False)


@dataclass
class Result:
    name: str
    intake_seconds: float
    e2e_seconds: float
    messages: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used
    sizing: Sizing | None = None  # ours: what PostgreSQL and NATS did per message

    @property
    def intake_rate(self) -> float:
        return self.messages / self.intake_seconds

    @property
    def e2e_rate(self) -> float:
        return self.messages / self.e2e_seconds

    @property
    def cpu_per_k(self) -> float:
        """CPU seconds per 1000 messages, all processes together."""
        return sum(self.cpu.values()) * 1000 / self.messages


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def postfix_cpu_seconds(queue_directory: Path) -> float:
    """The master's CPU, its exited children's (reaped: in its ``children`` times) and
    its live children's."""
    pid = int((queue_directory / "pid" / "master.pid").read_text().split()[0])
    master = psutil.Process(pid)
    times = master.cpu_times()
    own = times.user + times.system + times.children_user + times.children_system
    return float(own) + sum(_cpu_seconds(child.pid) for child in master.children(recursive=True))


def _tree_cpu_seconds(postgres: PostgresCluster) -> float:
    """CPU of the postmaster and all its backends (finished backends are not counted)."""
    pid = int((postgres.data / "postmaster.pid").read_text().split()[0])
    root = psutil.Process(pid)
    return sum(_cpu_seconds(p.pid) for p in [root, *root.children(recursive=True)])


class SmtpSink:
    """Postfix's smtp-sink with its running counter read from stdout."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.proc = subprocess.Popen(
            [find_binary("smtp-sink"), "-c", "-u", "postfix", f"127.0.0.1:{port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for_port("127.0.0.1", port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buffer = b""
        while chunk := os.read(fd, 4096):
            buffer = (buffer + chunk)[-200:]
            found = re.findall(rb"mesg=(\d+)", buffer)
            if found:
                self.count = int(found[-1])

    def wait_for(self, n: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sink got {self.count} of {n} messages in {timeout}s")
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def push(port: int, messages: int, sessions: int, size: int) -> None:
    subprocess.run(
        [
            find_binary("smtp-source"),
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            str(size),
            "-f",
            "bench@origin.test",
            "-t",
            "rcpt@destination.test",
            f"127.0.0.1:{port}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def measure(name: str, smtp_port: int, sink: SmtpSink, messages: int, sessions: int, size: int) -> Result:
    start = time.monotonic()
    push(smtp_port, messages, sessions, size)
    intake = time.monotonic() - start
    done = sink.wait_for(messages, timeout=max(120.0, messages / 5))
    return Result(name, intake, done - start, messages)


def run_ours(
    workdir: Path, messages: int, sessions: int, size: int, senders: int, ingest: int = 1, delivery_log: bool = True
) -> Result:
    postgres = PostgresCluster(workdir / "pg", durable=True, statements=True)
    redis = RedisServer(workdir / "redis")
    nats = NatsServer(workdir / "nats", monitor=True)
    sink = None
    system = None
    servers = [postgres, redis, nats]
    try:
        for server in servers:
            server.start()
        sink = SmtpSink(free_port())
        config_path = workdir / "zmta.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "log_level": os.environ.get("ZMTA_BENCH_LOG_LEVEL", "WARNING"),
                    "dbs": {"postgres": postgres.url, "redis": redis.url, "nats": nats.url, "postgres_pool_size": 30},
                    "smtp_interfaces": {"feeder": {"port": free_port()}},
                    "api": {"port": free_port()},
                    "delivery_log": {"retention_days": 30 if delivery_log else 0},
                    "metrics": {
                        "ingest_port": free_port(),
                        "queue_port": free_port(),
                        "sender_port": free_port(),
                        "bounce_port": free_port(),
                    },
                    # 20 parallel deliveries to the one destination: Postfix's default_destination_concurrency_limit
                    "zones": {
                        "default": {
                            "smarthost": f"127.0.0.1:{sink.port}",
                            "connections": 20,
                            "domains": {"*": {"connections": 20}},
                        },
                        "bounces": {},
                    },
                }
            )
        )
        config = load_config(config_path)
        system = System(config_path, config, workdir / "logs")
        system.start({"default": senders}, with_api=False, ingest=ingest)

        def cpu_now() -> dict[str, float]:
            cpu = {p.name: _cpu_seconds(p.proc.pid) for p in system.processes if p.proc is not None}
            cpu["postgres"] = _tree_cpu_seconds(postgres)
            cpu["nats"] = _cpu_seconds(nats.proc.pid) if nats.proc else 0.0
            return cpu

        assert nats.monitor_port is not None
        idle = cpu_now()  # what starting up cost is not the load's
        before = sizing.begin(postgres.url, nats.monitor_port)
        result = measure("zonemta-py", config.smtp_interfaces["feeder"].port, sink, messages, sessions, size)
        result.cpu = {name: seconds - idle.get(name, 0.0) for name, seconds in cpu_now().items()}
        result.sizing = sizing.end(postgres.url, nats.monitor_port, before, messages)
        return result
    finally:
        if system is not None:
            system.stop()
        if sink is not None:
            sink.stop()
        for server in reversed(servers):
            server.stop()


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
"""


@contextlib.contextmanager
def postfix_relay(workdir: Path, settings: str = "") -> Iterator[tuple[int, SmtpSink, Path]]:
    """A private Postfix instance relaying to its own smtp-sink: (its SMTP port, the sink,
    its queue directory). ``settings`` are more main.cf lines."""
    root = workdir / "postfix"
    conf = root / "conf"
    for sub in (conf, root / "queue", root / "data"):
        sub.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    shutil.chown(root / "data", "postfix")
    sink = SmtpSink(free_port())
    port = free_port()
    (conf / "main.cf").write_text(POSTFIX_MAIN.format(root=root, sink_port=sink.port) + settings)
    master = Path("/etc/postfix/master.cf").read_text()
    master = re.sub(r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master)
    (conf / "master.cf").write_text(master)
    postfix = find_binary("postfix")
    try:
        subprocess.run([postfix, "-c", str(conf), "start"], check=True, capture_output=True)
        wait_for_port("127.0.0.1", port)
        yield port, sink, root / "queue"
    finally:
        subprocess.run([postfix, "-c", str(conf), "stop"], capture_output=True)
        sink.stop()


def run_postfix(workdir: Path, messages: int, sessions: int, size: int) -> Result:
    with postfix_relay(workdir) as (port, sink, queue):
        idle = postfix_cpu_seconds(queue)
        result = measure("postfix", port, sink, messages, sessions, size)
        result.cpu = {"postfix": postfix_cpu_seconds(queue) - idle}
        return result


@cli.command()
def main(
    messages: Annotated[int, typer.Option("--messages", "-n")] = 2000,
    sessions: Annotated[int, typer.Option("--sessions", "-s")] = 20,
    size: Annotated[int, typer.Option("--size", help="message size in bytes")] = 10240,
    senders: Annotated[int, typer.Option(help="sender processes for our default zone")] = 1,
    runs: Annotated[int, typer.Option(min=1, help="runs of each relay, alternating")] = 3,
    ingest: Annotated[int, typer.Option(min=1, help="our ingest processes, sharing the SMTP port")] = 1,
    delivery_log: Annotated[
        bool, typer.Option(help="write the delivery log (--no-delivery-log: to measure what it costs)")
    ] = True,
) -> None:
    """Push the same load through ZoneMTA-py and through Postfix; print rates, CPU and ratios."""
    print(f"load: {messages} messages of {size} bytes over {sessions} sessions (smtp-source -> relay -> smtp-sink)")
    print(f"delivery log: {'on' if delivery_log else 'off'}")
    print(f"{'run':<4} {'relay':<12} {'intake msg/s':>13} {'end-to-end msg/s':>17} {'CPU s/1000 msg':>15}")
    ours: list[Result] = []
    theirs: list[Result] = []
    for run in range(1, runs + 1):
        workdir = Path(tempfile.mkdtemp(prefix="zmta-bench-"))
        workdir.chmod(0o755)
        try:
            ours.append(run_ours(workdir / "ours", messages, sessions, size, senders, ingest, delivery_log))
            _print_run(run, ours[-1])
            theirs.append(run_postfix(workdir, messages, sessions, size))
            _print_run(run, theirs[-1])
        finally:
            if not os.environ.get("ZMTA_BENCH_KEEP"):
                shutil.rmtree(workdir, ignore_errors=True)
        per_process = ", ".join(f"{name} {sec * 1000 / messages:.2f}" for name, sec in ours[-1].cpu.items())
        print(f"     our CPU s/1000 msg by process: {per_process}")
        _print_sizing(ours[-1].sizing)
    mine, postfix = _medians(ours), _medians(theirs)
    print("medians:")
    for name, (intake, e2e, cpu) in (("zonemta-py", mine), ("postfix", postfix)):
        print(f"{'':<4} {name:<12} {intake:>13.1f} {e2e:>17.1f} {cpu:>15.2f}")
    print(
        f"ratio ours/postfix (medians): intake {mine[0] / postfix[0]:.2f}, end-to-end {mine[1] / postfix[1]:.2f},"
        f" CPU per message {mine[2] / postfix[2]:.2f}"
    )
    _print_statements(ours[-1].sizing)


def _print_sizing(figures: Sizing | None) -> None:
    if figures is not None:
        print(
            f"     per message: PostgreSQL {figures.statements:.1f} statements, {figures.transactions:.1f} commits,"
            f" {figures.wal_bytes / 1024:.1f} KiB WAL; NATS {figures.nats_in:.1f} in, {figures.nats_out:.1f} out"
        )


def _print_statements(figures: Sizing | None) -> None:
    if figures is None:
        return
    print("our PostgreSQL statements, last run (per message; pg_stat_statements):")
    print(f"{'calls':>7} {'mean ms':>8} {'WAL B':>7}  statement")
    for statement in figures.top:
        print(f"{statement.calls:>7.2f} {statement.mean_ms:>8.2f} {statement.wal_bytes:>7.0f}  {statement.query}")


def _print_run(run: int, result: Result) -> None:
    print(
        f"{run:<4} {result.name:<12} {result.intake_rate:>13.1f} {result.e2e_rate:>17.1f} {result.cpu_per_k:>15.2f}",
        flush=True,
    )


def _medians(results: list[Result]) -> tuple[float, float, float]:
    return (
        statistics.median(r.intake_rate for r in results),
        statistics.median(r.e2e_rate for r in results),
        statistics.median(r.cpu_per_k for r in results),
    )


if __name__ == "__main__":
    cli()
