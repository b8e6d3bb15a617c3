"""``make bench``: our relay against Postfix on the same machine, same load, same sink.

For each of the two relays: start Postfix's ``smtp-sink`` as the next hop, start
the relay (ours: the five services on a fresh, durable PostgreSQL, Redis and
NATS; Postfix: a private instance relaying to the sink), push N messages of
S bytes with ``smtp-source`` over C sessions, and time

* intake: from the first connection until smtp-source has its last 250;
* end to end: from the first connection until the sink has counted all N.

It prints msg/s for both and the ratios ours/Postfix. The machines are shared and
noisy: run it a few times and compare ratios, not absolute figures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import psutil
import typer
import yaml

from zmta_common.config import load_config

from .servers import NatsServer, PostgresCluster, RedisServer, find_binary, free_port, wait_for_port
from .system import System

cli = typer.Typer(add_completion=False)


@dataclass
class Result:
    name: str
    intake_seconds: float
    e2e_seconds: float
    messages: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used

    @property
    def intake_rate(self) -> float:
        return self.messages / self.intake_seconds

    @property
    def e2e_rate(self) -> float:
        return self.messages / self.e2e_seconds


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


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


def run_ours(workdir: Path, messages: int, sessions: int, size: int, senders: int) -> Result:
    postgres = PostgresCluster(workdir / "pg", durable=True)
    redis = RedisServer(workdir / "redis")
    nats = NatsServer(workdir / "nats")
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
        system.start({"default": senders}, with_api=False)
        result = measure("zonemta-py", config.smtp_interfaces["feeder"].port, sink, messages, sessions, size)
        result.cpu = {p.name: _cpu_seconds(p.proc.pid) for p in system.processes if p.proc is not None}
        result.cpu["postgres"] = _tree_cpu_seconds(postgres)
        result.cpu["nats"] = _cpu_seconds(nats.proc.pid) if nats.proc else 0.0
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


def run_postfix(workdir: Path, messages: int, sessions: int, size: int) -> Result:
    root = workdir / "postfix"
    conf = root / "conf"
    for sub in (conf, root / "queue", root / "data"):
        sub.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    shutil.chown(root / "data", "postfix")
    sink = SmtpSink(free_port())
    port = free_port()
    (conf / "main.cf").write_text(POSTFIX_MAIN.format(root=root, sink_port=sink.port))
    master = Path("/etc/postfix/master.cf").read_text()
    master = re.sub(r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master)
    (conf / "master.cf").write_text(master)
    postfix = find_binary("postfix")
    try:
        subprocess.run([postfix, "-c", str(conf), "start"], check=True, capture_output=True)
        wait_for_port("127.0.0.1", port)
        return measure("postfix", port, sink, messages, sessions, size)
    finally:
        subprocess.run([postfix, "-c", str(conf), "stop"], capture_output=True)
        sink.stop()


@cli.command()
def main(
    messages: Annotated[int, typer.Option("--messages", "-n")] = 2000,
    sessions: Annotated[int, typer.Option("--sessions", "-s")] = 20,
    size: Annotated[int, typer.Option("--size", help="message size in bytes")] = 10240,
    senders: Annotated[int, typer.Option(help="sender processes for our default zone")] = 1,
) -> None:
    """Push the same load through ZoneMTA-py and through Postfix; print rates and ratios."""
    workdir = Path(tempfile.mkdtemp(prefix="zmta-bench-"))
    workdir.chmod(0o755)
    try:
        ours = run_ours(workdir / "ours", messages, sessions, size, senders)
        theirs = run_postfix(workdir, messages, sessions, size)
    finally:
        if not os.environ.get("ZMTA_BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"load: {messages} messages of {size} bytes over {sessions} sessions (smtp-source -> relay -> smtp-sink)")
    print(f"{'relay':<12} {'intake msg/s':>14} {'end-to-end msg/s':>18}")
    for r in (ours, theirs):
        print(f"{r.name:<12} {r.intake_rate:>14.1f} {r.e2e_rate:>18.1f}")
    per_k = ", ".join(f"{name} {seconds * 1000 / ours.messages:.2f}" for name, seconds in ours.cpu.items())
    print(f"our CPU seconds per 1000 messages: {per_k}")
    print(
        f"ratio ours/postfix: intake {ours.intake_rate / theirs.intake_rate:.2f}, "
        f"end-to-end {ours.e2e_rate / theirs.e2e_rate:.2f}"
    )


if __name__ == "__main__":
    cli()
