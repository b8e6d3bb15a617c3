"""The ``zmta`` command line: its offline commands (config check, DKIM keys that the sender
loads and dkimpy verifies against the printed record), and its commands against a real
deployment's API, run in-process through typer's CliRunner: the queue, the delivery log,
suppression, pauses, JSON output, keys, and the exit codes scripts rely on."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import re
import stat
import time
from pathlib import Path
from typing import Any

import dkim
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner, Result

from tests.e2e.test_outcomes import queued_id
from tests.support import Deployment, DeploymentFactory, eventually
from zmta_cli.__main__ import cli
from zmta_cli.settings import DEFAULT_URL
from zmta_common import redis_keys
from zmta_common.config import Api, load_config
from zmta_common.dkim_hash import BodyHasher
from zmta_common.shaping import Override
from zmta_devtools.servers import free_port
from zmta_sender.dkim_signer import sign
from zmta_sender.signing import load_keys

ADMIN_KEY = "zmta_cli-admin-key-for-tests"
SENDER = "ops@b.test"
NEEDS_NACL = pytest.mark.skipif(
    importlib.util.find_spec("nacl") is None, reason="dkimpy verifies ed25519-sha256 only with PyNaCl"
)


def zmta(*args: str, url: str | None = None, key: str | None = None, cli_config: Path | None = None) -> Result:
    """Run ``zmta ARGS`` in-process; the URL and key as the environment gives them, and the CLI's
    config file only when one is named (never the one of whoever runs the tests)."""
    env = {
        "ZMTA_API_URL": url,
        "ZMTA_API_KEY": key,
        "ZMTA_CLI_CONFIG": str(cli_config) if cli_config else "/nonexistent/zmta-cli.toml",
    }
    return CliRunner().invoke(cli, list(args), env=env)


def parsed(result: Result) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)


# -- offline -------------------------------------------------------------------------------


def test_default_url_is_the_apis_default_address() -> None:
    assert f"http://{Api().host}:{Api().port}" == DEFAULT_URL


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("zones:\n  default: {connections: 4}\n  bounces: {}\napi:\n  port: 8080\n")
    result = zmta("config", "check", str(good))
    assert (result.exit_code, result.stdout.strip(), result.stderr) == (0, f"{good}: ok", "")
    assert parsed(zmta("config", "check", str(good), "--json")) == {"file": str(good), "valid": True, "errors": []}


def test_config_check_names_every_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("zones:\n  default:\n    conections: 4\nsmtp_interfaces:\n  feeder:\n    port: lots\n")
    result = zmta("config", "check", str(bad))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert f"{bad}: zones.default.conections: Extra inputs are not permitted (got 4)" in lines
    assert any(line.startswith(f"{bad}: smtp_interfaces.feeder.port: ") and "'lots'" in line for line in lines)
    assert lines[-1] == f"zmta: {bad}: 2 errors"
    answer = json.loads(zmta("config", "check", str(bad), "--json").stdout)
    assert answer["valid"] is False
    assert sorted(e["key"] for e in answer["errors"]) == ["smtp_interfaces.feeder.port", "zones.default.conections"]


def test_config_check_reports_files_that_are_no_config(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("zones:\n  default: {connections: 4\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- zones\n")
    for path, said in (
        (broken, "not valid YAML: line 3, column 1"),
        (listed, "the top level must be a mapping"),
        (tmp_path / "missing.yaml", "no such file"),
    ):
        result = zmta("config", "check", str(path))
        assert result.exit_code == 1, path
        assert f"{path}: {said}" in result.stderr


def dkim_record(stdout: str) -> tuple[str, list[str]]:
    """The owner name and the character-strings of the TXT record keygen printed."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("publish at ")]
    strings = re.findall(r'"([^"]*)"', stdout)
    return line.removeprefix("publish at "), strings


@pytest.mark.parametrize("kind", ["rsa", pytest.param("ed25519", marks=NEEDS_NACL)])
def test_dkim_keygen_makes_a_key_the_sender_signs_with_and_dkimpy_verifies(tmp_path: Path, kind: str) -> None:
    key_dir = tmp_path / "dkim"
    config_file = tmp_path / "zmta.yaml"
    config_file.write_text(f"dkim:\n  key_dir: {key_dir}\n")
    options = ["--ed25519"] if kind == "ed25519" else []
    result = zmta("dkim", "keygen", "Example.COM", "s2026", *options, "--config", str(config_file))
    assert result.exit_code == 0, result.stderr
    key_file = key_dir / "example.com.s2026.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    owner, strings = dkim_record(result.stdout)
    assert owner == "s2026._domainkey.example.com."
    assert all(0 < len(s) <= 255 for s in strings)
    assert len(strings) == (2 if kind == "rsa" else 1)  # RSA 2048: a 392-character p=
    record = "".join(strings)
    assert record.startswith(f"v=DKIM1; k={kind}; p=")

    # The sender finds the key in dkim.key_dir by the file's name, and signs with it.
    (key,) = load_keys(load_config(config_file))["example.com"]
    assert (key.domain, key.selector) == ("example.com", "s2026")
    headers = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: keys\r\n"
    body = b"Signed with a key from zmta dkim keygen.\r\n"
    hasher = BodyHasher("relaxed")
    hasher.update(body)
    message = sign(headers, hasher.b64digest(), key) + headers + b"\r\n" + body

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        name = name.decode() if isinstance(name, bytes) else name
        return record.encode() if name.rstrip(".") + "." == owner else None

    assert dkim.verify(message, dnsfunc=dnsfunc)
    assert not dkim.verify(message.replace(b"Subject: keys", b"Subject: other"), dnsfunc=dnsfunc)


def test_dkim_keygen_keeps_an_existing_key_and_refuses_bad_names(tmp_path: Path) -> None:
    first = zmta("dkim", "keygen", "example.com", "sel", "--ed25519", "--out", str(tmp_path), "--json")
    made = parsed(first)
    assert (made["key_file"], made["name"]) == (str(tmp_path / "example.com.sel.pem"), "sel._domainkey.example.com.")
    pem = (tmp_path / "example.com.sel.pem").read_bytes()
    again = zmta("dkim", "keygen", "example.com", "sel", "--out", str(tmp_path))
    assert again.exit_code == 1
    assert "exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "example.com.sel.pem").read_bytes() == pem
    forced = zmta("dkim", "keygen", "example.com", "sel", "--bits", "1024", "--out", str(tmp_path), "--force")
    assert forced.exit_code == 0 and (tmp_path / "example.com.sel.pem").read_bytes() != pem
    # The file name <domain>.<selector>.pem leaves no room for a dot in the selector.
    for args in (["example.com", "a.b"], ["not a domain", "sel"]):
        refused = zmta("dkim", "keygen", *args, "--out", str(tmp_path))
        assert refused.exit_code == 1, args
    assert zmta("dkim", "keygen", "example.com", "sel", "--ed25519", "--bits", "2048").exit_code == 2
    assert zmta("dkim", "keygen", "example.com", "sel", "--bits", "512").exit_code == 2


def test_usage_errors_are_exit_code_2() -> None:
    assert zmta("queue", "list", "--state", "bogus").exit_code == 2
    assert zmta("queue", "hold").exit_code == 2  # neither an id nor --zone
    assert zmta("queue", "retry", "0123456789abcdef", "--zone", "default").exit_code == 2
    assert zmta("no-such-command").exit_code == 2


def test_an_api_that_does_not_answer_is_exit_code_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["zones"], ["queue", "list"], ["log", "search", "--to", "x@a.test"], ["pause", "default"]):
        result = zmta(*args, url=url)
        assert result.exit_code == 3, args
        assert result.stderr.startswith(f"zmta: cannot reach the API at {url}")
    with_key = zmta("zones", url=url.replace("http://", "http://ops:zmta_secret@"))
    assert with_key.exit_code == 3
    assert with_key.stderr.startswith(f"zmta: cannot reach the API at {url}:")  # the key is not shown


# -- against a deployment ------------------------------------------------------------------


@pytest.fixture(scope="module")
async def d(module_deploy: DeploymentFactory) -> Deployment:
    """API keys on (no open access), and a sender per zone: mail to refused.test is deferred
    (nothing listens at its MX) and waits 5 minutes for its next attempt. No traffic shaping:
    the refusals would suspend the site, and the retries with it."""
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    keys = [{"name": "ops", "hash": f"sha256:{digest}", "scopes": ["admin"]}]
    return await module_deploy({"api": {"open_access": False, "keys": keys}, "shaping": {"enabled": False}})


def run(d: Deployment, *args: str) -> Result:
    return zmta(*args, url=d.api_url, key=ADMIN_KEY)


async def send(d: Deployment, rcpt: str, subject: str = "cli") -> str:
    data = f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return queued_id(await asyncio.to_thread(d.smtp_send, SENDER, [rcpt], data))


def listed(d: Deployment, message_id: str, *options: str) -> list[dict]:
    answer = parsed(run(d, "queue", "list", "--json", *options))
    return [item for item in answer["list"] if item["id"] == message_id]


async def deferred(d: Deployment, rcpt: str) -> str:
    """A message to ``rcpt`` (at refused.test) once its first attempt failed."""
    message_id = await send(d, rcpt)
    await eventually(lambda: listed(d, message_id, "--state", "deferred"), what=f"{rcpt} deferred")
    return message_id


async def test_queue_list_shows_a_deferred_message_and_the_totals(d: Deployment) -> None:
    message_id = await deferred(d, "later@refused.test")
    (item,) = listed(d, message_id, "--zone", "default", "--domain", "REFUSED.test")
    assert (item["state"], item["seq"], item["recipient"], item["deferred"]) == (
        "deferred",
        "001",
        "later@refused.test",
        1,
    )
    assert listed(d, message_id, "--domain", "a.test") == []
    answer = parsed(run(d, "queue", "list", "--json"))
    assert answer["counters"]["deferred"]["rows"] >= 1

    result = run(d, "queue", "list")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "SEQ", "ZONE", "STATE", "RECIPIENT", "NEXT", "ATTEMPT", "DEFERRALS", "AGE"]
    (row,) = [line.split() for line in lines if line.startswith(message_id)]
    assert row[:5] == [message_id, "001", "default", "deferred", "later@refused.test"]
    assert row[5] == "in" and row[7] == "1"  # next attempt in about 5 minutes, one deferral
    totals = lines[lines.index("") + 1 :]
    assert totals[0].split() == ["ZONE", "QUEUED", "DEFERRED"]
    assert any(line.split()[0] == "default" and int(line.split()[2]) >= 1 for line in totals[1:])
    assert totals[-1].split()[0] == "total"


async def test_show_and_retry_a_message(d: Deployment) -> None:
    message_id = await deferred(d, "again@refused.test")
    shown = run(d, "queue", "show", message_id)
    assert shown.exit_code == 0, shown.stderr
    assert f"message {message_id}" in shown.stdout
    assert re.search(rf"^  from: +{SENDER}$", shown.stdout, re.MULTILINE)
    assert re.search(r"^  subject: +cli$", shown.stdout, re.MULTILINE)
    assert re.search(r"^\s+001\s+default\s+again@refused\.test\s+DEFERRED\s+1\s+in ", shown.stdout, re.MULTILINE)
    answer = parsed(run(d, "queue", "show", message_id, "--json"))
    assert answer["meta"]["id"] == message_id

    def logged() -> set[str]:
        return {entry["action"] for entry in parsed(run(d, "queue", "show", message_id, "--json"))["log"]}

    await eventually(lambda: {"QUEUED", "DEFERRED"} <= logged(), what="the message's log")
    text = run(d, "queue", "show", message_id).stdout
    log_lines = text[text.index("\nlog:\n") :].splitlines()[3:]
    assert [line.split()[2] for line in log_lines] == ["QUEUED", "DEFERRED"]  # in the order they happened

    def deferrals() -> int:
        (delivery,) = parsed(run(d, "queue", "show", message_id, "--json"))["messages"]
        return int(delivery.get("deferred", {}).get("count", 0))

    retried = run(d, "queue", "retry", message_id)
    assert (retried.exit_code, retried.stdout.strip()) == (0, f"message {message_id}: due now")
    await eventually(lambda: deferrals() == 2, what="the second attempt, right after the retry")
    by_domain = parsed(run(d, "queue", "retry", "--zone", "default", "--domain", "refused.test", "--json"))
    assert by_domain["success"] is True and by_domain["retried"] >= 1
    await eventually(lambda: deferrals() == 3, what="the third attempt, after the domain's retry")
    whole_zone = run(d, "queue", "retry", "--zone", "default")
    assert whole_zone.exit_code == 0 and "deferred deliveries due now" in whole_zone.stdout
    assert run(d, "queue", "retry", "--zone", "nowhere").exit_code == 1


async def test_hold_and_release_a_message(d: Deployment) -> None:
    message_id = await deferred(d, "held@refused.test")
    held = run(d, "queue", "hold", message_id)
    assert (held.exit_code, held.stdout.strip()) == (0, f"message {message_id}: 1 delivery held")
    assert [item["state"] for item in listed(d, message_id)] == ["held"]
    assert listed(d, message_id, "--state", "held")
    table = run(d, "queue", "list", "--state", "held").stdout
    assert re.search(rf"^{message_id}\s+001\s+default\s+held\s+held@refused\.test\s+held\s", table, re.MULTILINE)
    again = run(d, "queue", "hold", message_id)
    assert again.exit_code == 1 and "nothing to hold" in again.stderr

    released = parsed(run(d, "queue", "release", message_id, "--json"))
    assert released == {"success": True, "released": 1}
    assert listed(d, message_id, "--state", "held") == []
    not_held = run(d, "queue", "release", message_id)
    assert not_held.exit_code == 1
    assert not_held.stderr.strip() == f"zmta: message {message_id}: nothing to release (no delivery of it is held)"


async def test_drop_a_message_then_it_is_a_404(d: Deployment) -> None:
    message_id = await deferred(d, "dropped@refused.test")
    dropped = run(d, "queue", "drop", message_id)
    assert (dropped.exit_code, dropped.stdout.strip()) == (0, f"message {message_id}: dropped")
    shown = run(d, "queue", "show", message_id)
    assert shown.exit_code == 1
    assert shown.stdout == ""
    assert shown.stderr.strip() == f"zmta: message {message_id} is not in the queue (HTTP 404)"
    again = run(d, "queue", "drop", message_id)
    assert again.exit_code == 1 and "is not in the queue" in again.stderr


async def test_log_search_finds_a_delivered_message(d: Deployment, sinks: dict) -> None:
    message_id = await send(d, "cli-log@a.test")
    await eventually(lambda: sinks["127.0.0.2"].messages, what="the delivery")

    def accepted() -> list[dict]:
        entries = parsed(run(d, "log", "search", "--to", "CLI-log@a.test", "--since", "1h", "--json"))["entries"]
        return [e for e in entries if e["id"] == message_id and e["action"] == "ACCEPTED"]

    (entry,) = await eventually(accepted, what="the delivery in the log")
    assert (entry["to"], entry["zone"], entry["from"]) == ("cli-log@a.test", "default", SENDER)
    result = run(d, "log", "search", "--id", message_id, "--action", "accepted")
    assert result.exit_code == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if message_id in line]
    assert row.split()[2:7] == ["ACCEPTED", message_id, "001", "default", "cli-log@a.test"]
    everything = parsed(run(d, "log", "search", "--id", message_id, "--limit", "1", "--json"))
    assert len(everything["entries"]) == 1 and everything["next"]  # newest first; the QUEUED one is older
    older = parsed(run(d, "log", "search", "--id", message_id, "--json"))["entries"]
    assert [e["action"] for e in older][-1] == "QUEUED"
    assert run(d, "log", "search", "--since", "yesterday").exit_code == 1  # neither ISO 8601 nor an age
    nothing = run(d, "log", "search", "--id", message_id, "--until", "2000-01-01")
    assert nothing.stdout.strip() == "no log entries match"


async def test_suppression_list_add_list_remove(d: Deployment) -> None:
    added = parsed(run(d, "suppress", "add", "Nobody@Suppressed.test", "--json"))["suppressed"]
    domain = run(d, "suppress", "add", "suppressed-domain.test")
    assert domain.exit_code == 0 and domain.stdout.startswith("suppressed domain suppressed-domain.test (id ")
    entries = parsed(run(d, "suppress", "list", "--json"))["suppressed"]
    assert added["id"] in {e["id"] for e in entries}
    table = run(d, "suppress", "list").stdout
    assert re.search(rf"^{added['id']}\s+address\s+\S+@suppressed\.test\s", table, re.MULTILINE)
    assert re.search(r"\sdomain\s+suppressed-domain\.test\s", table)
    removed = run(d, "suppress", "remove", added["id"])
    assert (removed.exit_code, removed.stdout.strip()) == (0, f"removed {added['id']}")
    again = run(d, "suppress", "remove", added["id"])
    assert again.exit_code == 1 and "no suppression entry" in again.stderr
    assert run(d, "suppress", "add", "not an address@").exit_code == 1


async def test_pause_and_resume(d: Deployment) -> None:
    paused = run(d, "pause", "default", "Paused.test")
    assert (paused.exit_code, paused.stdout.strip()) == (0, "zone default, domain paused.test: paused")
    zones = run(d, "zones").stdout
    assert re.search(r"^default\s+\d+\s+\d+\s+paused\.test$", zones, re.MULTILINE)
    assert parsed(run(d, "zones", "--json")) == [{"name": "bounces"}, {"name": "default"}]
    assert run(d, "resume", "default", "paused.test").exit_code == 0
    again = run(d, "resume", "default", "paused.test")
    assert again.exit_code == 1
    assert again.stderr.strip() == "zmta: domain 'paused.test' of zone 'default' is not paused (HTTP 404)"
    assert run(d, "pause", "nowhere").exit_code == 1
    # queue hold/release with --zone and --domain pause and resume the domain.
    assert run(d, "queue", "hold", "--zone", "default", "--domain", "held.test").exit_code == 0
    assert re.search(r"^default\s.*held\.test$", run(d, "zones").stdout, re.MULTILINE)
    assert run(d, "queue", "release", "--zone", "default", "--domain", "held.test").exit_code == 0
    assert not re.search(r"held\.test", run(d, "zones").stdout)


async def test_shaping_list_and_lift(d: Deployment) -> None:
    """An override as a sender puts it in force (in Redis), listed and lifted through the API."""
    now = time.time()
    override = Override(
        zone="default",
        scope="site",
        site="mx.slow.test",
        address="",
        rule="cli-test",
        action="throttle",
        connections=2,
        rate="10/min",
        started=now,
        expires=now + 600,
        response="421 4.7.0 Too many connections, slow down",
    )
    redis = Redis.from_url(d.config.dbs.redis)
    try:
        await redis.hset(redis_keys.shaping("default"), override.key, override.to_json())
    finally:
        await redis.aclose()
    (entry,) = parsed(run(d, "shaping", "list", "--json"))["shaping"]
    assert (entry["zone"], entry["site"], entry["rule"], entry["connections"]) == (
        "default",
        "mx.slow.test",
        "cli-test",
        2,
    )
    table = run(d, "shaping", "list").stdout.splitlines()
    assert table[0].split() == ["ZONE", "SCOPE", "SITE", "ADDRESS", "ACTION", "ENDS", "RULE", "RESPONSE"]
    assert re.match(r"default +site +mx\.slow\.test +- +throttle 2 conn, 10/min +in 9m5\ds +cli-test +421 ", table[1])
    lifted = run(d, "shaping", "lift", "default", "--site", "mx.slow.test")
    assert (lifted.exit_code, lifted.stdout.strip()) == (0, "zone default: lifted throttle (site mx.slow.test)")
    assert run(d, "shaping", "list").stdout.strip() == "no traffic shaping override is in force"
    again = run(d, "shaping", "lift", "default", "--site", "mx.slow.test")
    assert again.exit_code == 1 and "no shaping override" in again.stderr


async def test_json_output_is_the_apis(d: Deployment) -> None:
    assert isinstance(parsed(run(d, "shaping", "list", "--json"))["shaping"], list)
    assert isinstance(parsed(run(d, "suppress", "list", "--json"))["suppressed"], list)
    empty = parsed(run(d, "queue", "list", "--zone", "bounces", "--json"))
    assert empty["list"] == [] and empty["more"] is False
    assert set(empty["counters"]) == {"zone", "active", "deferred"}
    assert parsed(run(d, "queue", "retry", "--zone", "bounces", "--json")) == {"success": True, "retried": 0}


async def test_the_key_from_the_options_the_environment_or_the_config_file(d: Deployment, tmp_path: Path) -> None:
    missing = zmta("zones", url=d.api_url)
    assert missing.exit_code == 1 and "API key" in missing.stderr and "(HTTP 401)" in missing.stderr
    wrong = zmta("zones", url=d.api_url, key="zmta_not-a-key")
    assert wrong.exit_code == 1 and "not valid" in wrong.stderr
    assert zmta("--key", ADMIN_KEY, "zones", url=d.api_url).exit_code == 0
    assert zmta("--api", d.api_url, "--key", ADMIN_KEY, "zones").exit_code == 0
    in_url = d.api_url.replace("http://", f"http://ops:{ADMIN_KEY}@")  # HTTP Basic, as zmta-webadmin sends it
    assert zmta("zones", url=in_url).exit_code == 0
    stored = tmp_path / "cli.toml"
    stored.write_text(f'url = "{d.api_url}"\nkey = "{ADMIN_KEY}"\n')
    assert parsed(zmta("zones", "--json", cli_config=stored)) == [{"name": "bounces"}, {"name": "default"}]
    stored.write_text(f'url = "{d.api_url}"\nkey = "{ADMIN_KEY}"\ncolour = "blue"\n')
    refused = zmta("zones", cli_config=stored)
    assert refused.exit_code == 1 and "unknown key 'colour'" in refused.stderr
