"""Adaptive traffic shaping through the whole system: one sender pod reads a provider's
push-back, and the whole zone (every pod, every domain of that provider's site) holds back
until the override ends or an operator lifts it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.support import MANY_DOMAINS, MANY_DOMAINS_MX, DeploymentFactory, eventually, log_entries, work_requests

SITE = "mx.many.test"  # every MANY_DOMAINS domain has this one MX host: one site
RULES = """
- name: provider-says-stop
  match: 'provider says stop'
  scope: site
  action: suspend
  duration: 600
"""


async def test_a_providers_signal_to_one_pod_holds_its_whole_site_until_lifted(
    deploy: DeploymentFactory, sinks: dict, tmp_path: Path
) -> None:
    rules = tmp_path / "shaping.yaml"
    rules.write_text(RULES)
    d = await deploy(
        {
            "shaping": {"rules_files": [str(rules)]},
            "queue": {"housekeeping_interval": 0.3},
            "zones": {"default": {"defer_times": [1, 60]}},  # the refused one is due again while held
        },
        senders={"default": 2},
    )
    provider = sinks[MANY_DOMAINS_MX]
    provider.handler.scripted[f"first@{MANY_DOMAINS[0]}"] = ["421 4.7.0 The provider says stop, try later"]
    data = b"Subject: shaping\r\n\r\nbody\r\n"
    await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"first@{MANY_DOMAINS[0]}"], data)

    async with httpx.AsyncClient(base_url=d.api_url) as api:

        async def in_force() -> list:
            entries: list = (await api.get("/shaping")).json()["shaping"]
            return entries

        (override,) = await eventually(in_force, what="the override on GET /shaping")
        assert (override["zone"], override["scope"], override["site"]) == ("default", "site", SITE)
        assert (override["rule"], override["action"]) == ("provider-says-stop", "suspend")
        assert "provider says stop" in override["response"]
        (started,) = log_entries(_sender_log(d.log_dir), "shaping started")
        assert started["site"] == SITE

        # Other domains of the same site wait, whichever pod would have taken them; another
        # site's mail goes on.
        held = [f"r@{domain}" for domain in MANY_DOMAINS[1:5]]
        async with work_requests(d) as requests:
            await asyncio.to_thread(d.smtp_send, "s@origin.test", [*held, "r@a.test"], data)
            await eventually(lambda: sinks["127.0.0.2"].messages, what="the other site's delivery")
            await requests.two_more()
            await requests.two_more()  # of 4 requests from 2 pods, one was answered with the mail there
        assert provider.messages == []
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{d.config.metrics.queue_port}/metrics")).text
        assert 'zonemta_shaping_active{action="suspend",scope="site",zone="default"} 1.0' in metrics

        # Lifted: the configured limits apply again at once.
        missing = await api.delete("/shaping/default", params={"site": "mx.other.test"})
        assert missing.status_code == 404 and "no shaping override" in missing.json()["error"]
        lifted = await api.delete("/shaping/default", params={"site": SITE})
        assert lifted.status_code == 200, lifted.text
        assert lifted.json()["lifted"]["rule"] == "provider-says-stop"
        assert await in_force() == []
    await eventually(lambda: len(provider.messages) == 5, timeout=30, what="the held deliveries and the retried one")
    assert {r for m in provider.messages for r in m.rcpt_tos} == {*held, f"first@{MANY_DOMAINS[0]}"}
    (entry,) = log_entries(d.log_dir / "api.log", "shaping lifted")
    assert entry["site"] == SITE


def _sender_log(log_dir: Path) -> Path:
    """The log of the pod that read the reply (either of the two)."""
    logs = [p for p in sorted(log_dir.glob("sender*.log")) if log_entries(p, "shaping started")]
    assert len(logs) == 1, logs
    return logs[0]
