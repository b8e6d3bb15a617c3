"""The ``zmta`` command group: its global options, the API client its commands share, and
the one place where an error becomes a message on stderr and an exit code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .client import Api
from .errors import CliError, NothingDone
from .output import emit_json
from .settings import DEFAULT_URL, Settings, resolve

JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON instead of a table")]


class Group(TyperGroup):
    """Every command runs inside this group's ``invoke``: a :class:`CliError` raised anywhere
    below ends the program with its message on stderr and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as exc:
            typer.echo(f"zmta: {exc.message}", err=True)
            raise typer.Exit(exc.code) from None


def typer_app(help: str, cls: type[TyperGroup] = TyperGroup) -> typer.Typer:
    # pretty_exceptions_show_locals: a crash report must not print the API key.
    return typer.Typer(
        cls=cls,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_show_locals=False,
    )


cli = typer_app(
    "ZoneMTA-py for operators: the queue, the delivery log, suppression, pauses and traffic shaping"
    " through the HTTP API; config checks and DKIM keys offline.\n\n"
    "Exit codes: 0 done, 1 an error from the API or invalid input (the message on stderr),"
    " 2 a usage error, 3 the API cannot be reached.",
    cls=Group,
)


@dataclass(slots=True)
class Session:
    """The global options, and the client made from them when a command first needs it."""

    url: str | None
    key: str | None
    timeout: float
    client: Api | None = None


@cli.callback()
def main(
    ctx: typer.Context,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api",
            envvar="ZMTA_API_URL",
            help=f"URL of the HTTP API; else `url` in ~/.config/zmta/cli.toml, else {DEFAULT_URL}",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key", envvar="ZMTA_API_KEY", help="API key (admin scope); else `key` in ~/.config/zmta/cli.toml"
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for each answer of the API")] = 30.0,
) -> None:
    ctx.obj = Session(api_url, key, timeout)


def api(ctx: typer.Context) -> Api:
    """The API client of this run (closed when the command ends)."""
    session = ctx.find_object(Session)
    assert session is not None, "the zmta group's callback sets the session"
    if session.client is None:
        settings: Settings = resolve(session.url, session.key, session.timeout)
        session.client = Api(settings)
        ctx.find_root().call_on_close(session.client.close)
    return session.client


def outcome(answer: Any, json_out: bool, done: str) -> None:
    """Print what a change route answered (``{"success": true}``, with ``message`` when nothing
    changed: then the message is an error, exit 1)."""
    if json_out:
        emit_json(answer)
    message = answer.get("message") if isinstance(answer, dict) else None
    if message:
        raise NothingDone(str(message))
    if not json_out:
        typer.echo(done)
