"""``zmta`` (``python -m zmta_cli``): the command tree, assembled from its modules."""

from __future__ import annotations

from .admin_commands import shaping, suppress
from .app import cli
from .log_commands import log
from .offline_commands import config, dkim
from .queue_commands import queue

cli.add_typer(queue, name="queue")
cli.add_typer(log, name="log")
cli.add_typer(suppress, name="suppress")
cli.add_typer(shaping, name="shaping")
cli.add_typer(config, name="config")
cli.add_typer(dkim, name="dkim")

__all__ = ["cli"]

if __name__ == "__main__":
    cli()
