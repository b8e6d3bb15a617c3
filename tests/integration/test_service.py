"""zmta_common.service: the start-up and shutdown every service shares."""

from __future__ import annotations

import pytest

from tests.support import Deployment, DeploymentFactory
from zmta_common import service


async def _sessions(d: Deployment) -> int:
    """Sessions open on the deployment's database, other than the test's own store."""
    count = await d.store.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return int(count)


async def test_a_service_closes_its_connections_however_it_ends(deploy: DeploymentFactory) -> None:
    d = await deploy(start=False)
    before = await _sessions(d)
    opened: list[service.Connections] = []

    async def start_up() -> None:
        async with service.connections(d.config, "t") as conn:
            opened.append(conn)
            await conn.redis.ping()
            assert await conn.store.pool.fetchval("SELECT 1") == 1
            assert conn.bus.nc.is_connected
            raise RuntimeError("plugin blew up")  # a start-up step that fails after connecting

    with pytest.raises(RuntimeError, match="plugin blew up"):
        await start_up()
    (conn,) = opened
    assert conn.store.pool.is_closing()
    assert conn.bus.nc.is_closed
    assert await _sessions(d) <= before
