"""Prometheus metrics under the original's names, and the small HTTP server that serves them.

The original's counters are exposed without the ``_total`` suffix that
prometheus_client adds to its Counter type (``zonemta_delivery_status``, not
``zonemta_delivery_status_total``), so that dashboards built for ZoneMTA keep
working; :class:`Tally` does that. ``zonemta_delivery_status`` carries both the
label the original's README names (``result``) and the one its code sets
(``status``), plus ``zone``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Tally(Collector):
    """A monotonically growing count, exposed under exactly its name."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._values: dict[tuple[str, ...], float] = {}
        if registry is not None:
            registry.register(self)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        key = tuple(labels[name] for name in self.labelnames)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(labels[name] for name in self.labelnames), 0.0)

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "unknown")
        for key, value in sorted(self._values.items()):
            metric.add_sample(self.name, dict(zip(self.labelnames, key, strict=True)), value)
        yield metric


message_push = Tally("zonemta_message_push", "Messages stored for delivery", ("result",))
message_drop = Tally("zonemta_message_drop", "Messages not accepted for delivery (rejected, dropped, failed to store)")
delivery_status = Tally("zonemta_delivery_status", "Delivery outcomes", ("result", "status", "zone"))
bounce_generation = Tally("zonemta_bounce_generation", "Bounces generated")
queue_size = Gauge("zonemta_queue_size", "Deliveries in the queue", ("type", "zone"))
blacklisted = Gauge("zonemta_blacklisted", "Blacklisted recipient domain and local address pairs")
shaping_active = Gauge("zonemta_shaping_active", "Traffic shaping overrides in force", ("zone", "scope", "action"))


def count_delivery(status: str, zone: str) -> None:
    delivery_status.inc(result=status, status=status, zone=zone)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


async def metrics_endpoint(_: Request) -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE)


HealthCheck = Callable[[], Awaitable[dict[str, object]]]


def health_endpoint(check: HealthCheck) -> Callable[[Request], Awaitable[Response]]:
    async def health(_: Request) -> Response:
        try:
            detail = await check()
        except Exception as exc:  # any failure makes the service unhealthy, with the reason
            return JSONResponse({"status": "fail", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", **detail})

    return health


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside a service's own event loop: the service owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(host: str, port: int, check: HealthCheck) -> asyncio.Task[None]:
    """Serve /metrics and /health in this event loop; return the server task."""
    app = Starlette(routes=[Route("/metrics", metrics_endpoint), Route("/health", health_endpoint(check))])
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(), name=f"metrics:{port}")
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
        await asyncio.sleep(0.01)
    return task
