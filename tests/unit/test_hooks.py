"""The plugin loader and hook runner."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from zmta_common.config import Config, Plugin
from zmta_common.headers import HeaderBlock
from zmta_common.hooks import Hooks, PluginError, Reject, load


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_handlers_run_in_order_sync_and_async() -> None:
    hooks = Hooks()
    seen: list[str] = []

    def first(headers: HeaderBlock) -> None:
        seen.append("first")
        headers.add("X-First", "1")

    async def second(headers: HeaderBlock) -> None:
        seen.append("second")
        headers.set("X-First", "2")

    hooks.add("message:headers", first, "p1")
    hooks.add("message:headers", second, "p2")
    headers = HeaderBlock()
    run(hooks.run("message:headers", headers))
    assert seen == ["first", "second"]
    assert headers.to_bytes() == b"X-First: 2\r\n"
    assert not hooks.has("sender:headers")
    run(hooks.run("sender:headers", headers))  # nothing registered: nothing happens


def test_a_reject_stops_the_chain_and_a_crash_becomes_a_temporary_refusal() -> None:
    hooks = Hooks()
    later: list[str] = []
    hooks.add("smtp:rcpt_to", lambda env, rcpt: (_ for _ in ()).throw(Reject(550, "5.7.1 closed")), "p1")
    hooks.add("smtp:rcpt_to", lambda env, rcpt: later.append(rcpt), "p2")
    with pytest.raises(Reject) as refused:
        run(hooks.run("smtp:rcpt_to", None, "x@a.test"))
    assert (refused.value.reply, refused.value.temporary, later) == ("550 5.7.1 closed", False, [])

    broken = Hooks()
    broken.add("message:headers", lambda headers: 1 / 0, "buggy")
    with pytest.raises(Reject) as failed:
        run(broken.run("message:headers", HeaderBlock()))
    assert failed.value.code == 451 and failed.value.temporary
    assert "Plugin buggy failed: ZeroDivisionError" in failed.value.reply


def test_unknown_hooks_codes_and_plugins_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PluginError, match="no hook named 'message:header'"):
        Hooks().add("message:header", print, "typo")
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Reject(250, "ok")
    with pytest.raises(PluginError, match="cannot be imported"):
        load(Config(plugins={"no_such_module_here": Plugin()}), "ingest")
    (tmp_path / "noinit_plugin.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="has no init"):
        load(Config(plugins={"noinit_plugin": Plugin()}), "ingest")
    sys.modules.pop("noinit_plugin", None)


def test_the_example_plugin_loads_with_its_options() -> None:
    config = Config(
        plugins={
            "zmta_common.plugins.example": Plugin.model_validate(
                {"subject_prefix": "[ext]", "reject": {"No@A.test": "551 5.1.6 moved"}}
            ),
            "zmta_common.plugins.disabled_one": Plugin(enabled=False),  # not imported at all
        }
    )
    hooks = load(config, "ingest")
    headers = HeaderBlock.parse(b"Subject: hello\r\n")
    run(hooks.run("message:headers", None, headers))
    assert headers.get("subject") == "[ext] hello"
    with pytest.raises(Reject, match=r"551 5\.1\.6 moved"):
        run(hooks.run("smtp:rcpt_to", None, "no@a.test"))
    run(hooks.run("smtp:rcpt_to", None, "yes@a.test"))
