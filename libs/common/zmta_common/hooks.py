"""Plugins: Python modules named in the config that hook into a message's way.

A plugin is a module with an ``init(app)`` function; ``app`` is a :class:`PluginApp`
that carries the plugin's options and lets it register handlers by hook name::

    def init(app):
        app.hook("message:headers", add_footer_header)

Every service loads every enabled plugin (same config file everywhere), and each runs
the hooks of the events that happen in it:

================== ========= ===================================================
hook               service   handler arguments
================== ========= ===================================================
smtp:auth          ingest    (auth: AuthRequest): set ``auth.accepted``
smtp:mail_from     ingest    (envelope, address)
smtp:rcpt_to       ingest    (envelope, address)
message:headers    ingest,   (envelope, headers: HeaderBlock): edit the headers
                   api
message:store      ingest,   (envelope, headers, body: StoredBody): the whole
                   api       message is written but not yet committed
                             (body.queue_id, body.size, body.chunks())
queue:route        ingest,   (envelope, routes: dict[recipient, zone]): reroute
                   api
sender:fetch       sender    (delivery: DeliveryContext): e.g. set ``http_url``
sender:headers     sender    (delivery, headers: HeaderBlock): edit before signing
sender:connect     sender    (delivery, target host)
sender:delivered   sender    (delivery, response)
queue:bounce       bounce    (event: BounceEvent): raise Reject to send no DSN
log:entry          queue     (entry: dict): one per delivery outcome
================== ========= ===================================================

A handler may be a plain or an async function. Raising :class:`Reject` refuses with
that SMTP code and text (a 4xx is temporary: the client, or the sender's retry,
tries again); any other exception is a failure of the plugin, turned into a
temporary refusal so that nothing is accepted or bounced because of a bug.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config

log = logging.getLogger(__name__)

HOOKS = frozenset(
    {
        "smtp:auth",
        "smtp:mail_from",
        "smtp:rcpt_to",
        "message:headers",
        "message:store",
        "queue:route",
        "sender:fetch",
        "sender:headers",
        "sender:connect",
        "sender:delivered",
        "queue:bounce",
        "log:entry",
    }
)

Handler = Callable[..., Any]


class PluginError(Exception):
    """A plugin that cannot be loaded, or registers a hook that does not exist."""


class Reject(Exception):
    """Refuse what the hook is about with an SMTP reply ``code text``."""

    def __init__(self, code: int, text: str) -> None:
        if not 400 <= code <= 599:
            raise ValueError(f"reject code must be 4xx or 5xx, not {code}")
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def temporary(self) -> bool:
        return self.code < 500


@dataclass(slots=True)
class _Registered:
    plugin: str
    handler: Handler


class Hooks:
    """The handlers of every loaded plugin, by hook name, in config order."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[_Registered]] = defaultdict(list)

    def add(self, name: str, handler: Handler, plugin: str = "") -> None:
        if name not in HOOKS:
            raise PluginError(f"plugin {plugin!r}: no hook named {name!r} (hooks: {', '.join(sorted(HOOKS))})")
        self._handlers[name].append(_Registered(plugin, handler))

    def has(self, name: str) -> bool:
        return bool(self._handlers.get(name))

    async def run(self, name: str, *args: Any) -> None:
        """Run the hook's handlers in order; the first Reject stops the rest."""
        for item in self._handlers.get(name, ()):
            try:
                result = item.handler(*args)
                if inspect.isawaitable(result):
                    await result
            except Reject:
                raise
            except Exception as exc:
                log.exception("plugin failed", extra={"plugin": item.plugin, "hook": name})
                raise Reject(451, f"4.3.0 Plugin {item.plugin} failed: {type(exc).__name__}") from exc


@dataclass(slots=True)
class PluginApp:
    """What a plugin's ``init`` gets: its name, options, the service it runs in, the config."""

    name: str
    options: dict[str, Any]
    service: str
    config: Config
    hooks: Hooks

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"plugin.{self.name}")

    def hook(self, name: str, handler: Handler) -> None:
        self.hooks.add(name, handler, self.name)


def load(config: Config, service: str) -> Hooks:
    """Import and initialise every enabled plugin of the config, in order."""
    hooks = Hooks()
    for path, entry in config.plugins.items():
        if not entry.enabled:
            continue
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise PluginError(f"plugin {path!r} cannot be imported: {exc}") from None
        init = getattr(module, "init", None)
        if not callable(init):
            raise PluginError(f"plugin {path!r} has no init(app) function")
        init(PluginApp(path, entry.options, service, config, hooks))
        log.info("plugin loaded", extra={"plugin": path})
    return hooks
