"""The sender's SMTP session (zmta_sender.smtp_session) and its use by smtp_client.deliver,
against a scripted SMTP server on loopback that records how the commands arrived.

The server is raw asyncio, so that it can show what a polite server would hide: the
commands of each read (PIPELINING: MAIL, RCPT and DATA in one), replies it was told to
give, hang-ups in the middle of a transaction, over-long replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from tests.support import eventually
from zmta_sender.connections import ConnectionPool
from zmta_sender.errors import DeliveryError
from zmta_sender.mx import Target
from zmta_sender.outgoing import wire_chunks
from zmta_sender.smtp_client import Attempt, ReplyError, deliver
from zmta_sender.smtp_session import MAX_LINE, SmtpBroken, SmtpRefused, SmtpSession
from zmta_sender.tls import NONE, OPPORTUNISTIC, REQUIRED, TlsContexts, TlsPolicy, outcome

EXTENSIONS = ["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 1000000", "auth=login plain"]
HEAD = b"Subject: session test\r\n"
MX = "mx.session.test"


@dataclass
class Message:
    mail_from: str
    rcpt_to: list[str]
    data: bytes  # dot-unstuffed, without the end mark
    tls: str


@dataclass
class ScriptedServer:
    """An SMTP server on 127.0.0.1 that does what ``replies`` and ``hang_up`` say and records it all."""

    extensions: list[str] = field(default_factory=lambda: list(EXTENSIONS))
    tls: ssl.SSLContext | None = None  # STARTTLS offered with this context
    # Per verb (GREETING, EHLO, STARTTLS, MAIL, RCPT, DATA, BODY: the final reply): replies used up one by one.
    replies: dict[str, list[str]] = field(default_factory=dict)
    # Verbs (or BODY: the first octets of a body) at which the server hangs up, used up one by one.
    hang_up: list[str] = field(default_factory=list)
    reads: list[list[str]] = field(default_factory=list)  # the commands of each read
    commands: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        """Connections still served: one the client closed is gone once all it sent was read."""
        return len(self._writers)

    def scripted(self, verb: str, default: str) -> str:
        replies = self.replies.get(verb)
        return replies.pop(0) if replies else default

    def hangs_up(self, verb: str) -> bool:
        if self.hang_up and self.hang_up[0] == verb:
            self.hang_up.pop(0)
            return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[0])
        self._writers.add(writer)
        try:
            await _Connection(self, reader, writer).run()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away, or failed the TLS handshake
        finally:
            self._writers.discard(writer)
            writer.close()


class _Connection:
    def __init__(self, server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.buffer = b""
        self.out: list[str] = []
        self.secure = False
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.in_data = False

    async def run(self) -> None:
        greeting = self.server.scripted("GREETING", f"220 {MX} ESMTP")
        self.writer.write(greeting.encode() + b"\r\n")
        if not greeting.startswith("2"):
            return
        while data := await self.reader.read(65536):
            self.buffer += data
            commands: list[str] = []
            go_on = await self.process(commands)
            if commands:
                self.server.reads.append(commands)
            self.flush()
            if not go_on:
                return

    async def process(self, commands: list[str]) -> bool:
        """Handle what the buffer holds; False to hang up."""
        while True:
            if self.in_data:
                if self.buffer and self.server.hangs_up("BODY"):
                    return False
                if not self.take_body():
                    return True
                continue
            line, separator, rest = self.buffer.partition(b"\r\n")
            if not separator:
                return True
            self.buffer = rest
            command = line.decode("utf-8")
            commands.append(command)
            self.server.commands.append(command)
            verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
            if self.server.hangs_up(verb):
                return False
            self.out.append(self.reply(verb, command))
            if verb == "QUIT":
                return False
            if verb == "STARTTLS" and self.out[-1].startswith("220"):
                self.flush()
                assert self.server.tls is not None
                await self.writer.start_tls(self.server.tls)
                self.secure = True
                self.reset()

    def reply(self, verb: str, command: str) -> str:
        if verb == "EHLO":
            offered = [*self.server.extensions, *(["STARTTLS"] if self.server.tls and not self.secure else [])]
            lines = [MX, *offered]
            default = "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"
            return self.server.scripted("EHLO", default)
        if verb == "MAIL":
            reply = self.server.scripted("MAIL", "250 2.1.0 Ok")
            self.mail_from = command[10:].split(">")[0].lstrip("<") if reply.startswith("2") else None
            return reply
        if verb == "RCPT":
            if self.mail_from is None:
                return "503 5.5.1 MAIL first"
            reply = self.server.scripted("RCPT", "250 2.1.5 Ok")
            if reply.startswith("2"):
                self.rcpt_to.append(command[8:].split(">")[0].lstrip("<"))
            return reply
        if verb == "DATA":
            default = "354 End data with <CR><LF>.<CR><LF>"
            if self.mail_from is None or not self.rcpt_to:
                default = "554 5.5.1 No valid recipients"
            reply = self.server.scripted("DATA", default)  # a scripted 354 may be wrong: a broken server
            self.in_data = reply.startswith("354")
            return reply
        if verb == "STARTTLS":
            return self.server.scripted("STARTTLS", "220 2.0.0 Ready to start TLS")
        if verb == "RSET":
            self.reset()
            return "250 2.0.0 Ok"
        if verb == "QUIT":
            return "221 2.0.0 Bye"
        return "500 5.5.2 Unknown command"

    def take_body(self) -> bool:
        """The message, if its end mark is in the buffer."""
        data = b"\r\n" + self.buffer
        end = data.find(b"\r\n.\r\n")
        if end < 0:
            return False
        body = data[2 : end + 2].replace(b"\r\n..", b"\r\n.")
        body = body[1:] if body.startswith(b"..") else body
        self.buffer = data[end + 5 :]
        ssl_object = self.writer.get_extra_info("ssl_object")
        tls = ssl_object.version() if ssl_object else ""
        assert self.mail_from is not None
        self.server.messages.append(Message(self.mail_from, self.rcpt_to, body, tls))
        self.out.append(self.server.scripted("BODY", "250 2.0.0 Ok: queued"))
        self.reset()
        return True

    def flush(self) -> None:
        if self.out:
            self.writer.write("".join(f"{reply}\r\n" for reply in self.out).encode())
            self.out.clear()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def contexts(ca: trustme.CA, tmp_path: Path) -> TlsContexts:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TlsContexts(str(ca_file))


def server_context(ca: trustme.CA, sni: list[str]) -> ssl.SSLContext:
    """A certificate of the test CA for MX; the names clients ask for (SNI) go into ``sni``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(MX).configure_cert(context)
    context.sni_callback = lambda _obj, name, _ctx: sni.append(name or "")
    return context


async def connect(server: ScriptedServer, source_ip: str | None = None) -> SmtpSession:
    session = await SmtpSession.connect(
        "127.0.0.1", server.port, source_ip=source_ip, connect_timeout=5, command_timeout=5
    )
    await session.ehlo("client.test")
    return session


async def refused_send(server: ScriptedServer) -> tuple[SmtpSession, SmtpRefused]:
    """Connect and send one message that the server refuses; the session and the refusal."""
    session = await connect(server)
    with pytest.raises(SmtpRefused) as refused:
        await session.send("from@origin.test", "rcpt@session.test", body())
    return session, refused.value


async def body(text: bytes = b"Hello.\r\n.a line with a dot\r\n") -> AsyncIterator[bytes]:
    async def source() -> AsyncIterator[bytes]:
        yield text

    async for chunk in wire_chunks(HEAD, source()):
        yield chunk


def attempt(policy: TlsPolicy, recipient: str = "rcpt@session.test") -> Attempt:
    return Attempt(
        mail_from="from@origin.test",
        recipient=recipient,
        ehlo_name="client.test",
        source_ip=None,
        connect_timeout=5,
        command_timeout=5,
        tls=policy,
        size=123,
    )


def target(server: ScriptedServer) -> list[Target]:
    return [Target(MX, "127.0.0.1", server.port)]


ENVELOPE = ["MAIL FROM:<from@origin.test> BODY=8BITMIME SIZE=42", "RCPT TO:<rcpt@session.test>", "DATA"]


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    """A connection pool for one test; what it parked is closed afterwards."""
    connections = ConnectionPool()
    yield connections
    await connections.close_all()


async def test_pipelining_sends_mail_rcpt_and_data_in_one_write(server: ScriptedServer) -> None:
    session = await connect(server)
    assert session.extensions["SIZE"] == "1000000"
    assert session.supports("pipelining") and session.supports("AUTH") and session.extensions["AUTH"] == "login plain"
    reply = await session.send("from@origin.test", "rcpt@session.test", body(), ["BODY=8BITMIME"], size=42)
    assert (reply.code, reply.text) == (250, "2.0.0 Ok: queued")
    # One read held all three: the server had not replied to MAIL before DATA was there.
    assert server.reads == [["EHLO client.test"], ENVELOPE]
    assert server.messages == [
        Message("from@origin.test", ["rcpt@session.test"], HEAD + b"\r\nHello.\r\n.a line with a dot\r\n", "")
    ]
    await session.quit()
    assert not session.usable
    assert server.commands[-1] == "QUIT"


async def test_one_command_per_round_trip_without_pipelining(server: ScriptedServer) -> None:
    server.extensions = ["8BITMIME"]
    session = await connect(server)
    await session.send("from@origin.test", "rcpt@session.test", body(), ["BODY=8BITMIME"], size=42)
    # Without SIZE offered, none is declared; every command waited for the reply to the one before.
    assert server.reads == [["EHLO client.test"], [ENVELOPE[0].removesuffix(" SIZE=42")], ENVELOPE[1:2], ["DATA"]]
    assert len(server.messages) == 1
    session.close()


async def test_a_refused_recipient_in_a_pipelined_group_sends_no_body(server: ScriptedServer) -> None:
    server.replies["RCPT"] = ["550-5.1.1 No such user\r\n550 5.1.1 Really not"]
    session, refusal = await refused_send(server)
    assert (refusal.stage, refusal.code) == ("rcpt", 550)
    assert refusal.text == "5.1.1 No such user\n5.1.1 Really not"
    # DATA's 554 was read and dropped: the session is in step, and RSET makes it ready for another.
    assert session.usable
    await session.rset()
    await session.send("from@origin.test", "other@session.test", body(b"second\r\n"))
    assert server.commands[4:] == ["RSET", "MAIL FROM:<from@origin.test>", "RCPT TO:<other@session.test>", "DATA"]
    assert [m.rcpt_to for m in server.messages] == [["other@session.test"]]  # the first body never went
    session.close()


@pytest.mark.parametrize("after", ["hang-up", "354"])
async def test_a_refused_recipient_then_no_usable_reply_to_data(server: ScriptedServer, after: str) -> None:
    """A server that hangs up instead of answering DATA, or (broken) says 354 to it: the
    refusal stands, no body goes, and the session is closed (it cannot be in step)."""
    server.replies["RCPT"] = ["550 5.1.1 No such user"]
    if after == "354":
        server.replies["DATA"] = ["354 go ahead anyway"]
    else:
        server.hang_up = ["DATA"]
    session, refusal = await refused_send(server)
    assert (refusal.stage, refusal.code) == ("rcpt", 550)
    assert not session.usable
    # Once the server has read the client's hang-up, it has read all the client sent before it.
    await eventually(
        lambda: server.open_connections == 0, timeout=5, interval=0.01, what="the server to see the hang-up"
    )
    assert server.commands[-1] == "DATA" and server.messages == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_refused_sender_is_refused_at_mail(server: ScriptedServer, pipelining: bool) -> None:
    if not pipelining:
        server.extensions.remove("PIPELINING")
    server.replies["MAIL"] = ["451 4.3.0 Try later"]
    session, refusal = await refused_send(server)
    assert (refusal.stage, refusal.code, refusal.text) == ("mail", 451, "4.3.0 Try later")
    mail = "MAIL FROM:<from@origin.test>"
    assert server.commands[1:] == ([mail, *ENVELOPE[1:]] if pipelining else [mail])
    assert server.messages == []
    session.close()


async def test_a_refused_data_command_is_refused_at_data(server: ScriptedServer) -> None:
    server.replies["DATA"] = ["452 4.3.1 Insufficient system storage"]
    session, refusal = await refused_send(server)
    assert (refusal.stage, refusal.code) == ("data", 452)
    assert server.commands[-1] == "DATA" and server.messages == []
    session.close()


async def test_a_final_refusal_after_the_body_is_refused_at_data(server: ScriptedServer) -> None:
    server.replies["BODY"] = ["554-5.7.1 Message refused\r\n554 5.7.1 as spam"]
    session, refusal = await refused_send(server)
    assert (refusal.stage, refusal.code) == ("data", 554)
    assert refusal.text == "5.7.1 Message refused\n5.7.1 as spam"
    assert len(server.messages) == 1  # the body went
    session.close()


async def test_a_multi_line_final_reply(server: ScriptedServer) -> None:
    server.replies["BODY"] = ["250-2.0.0 Ok\r\n250-queued as 1234\r\n250 have a nice day"]
    session = await connect(server)
    reply = await session.send("from@origin.test", "rcpt@session.test", body())
    assert str(reply) == "250 2.0.0 Ok\nqueued as 1234\nhave a nice day"
    session.close()


@pytest.mark.parametrize(
    "ehlo",
    [
        "250-" + "x" * (MAX_LINE + 10),  # one line longer than a line may be
        "\r\n".join(["250-" + "y" * 1000] * 40) + "\r\n250 end",  # lines of a fair length, too many
    ],
)
async def test_an_over_long_reply_is_an_error(server: ScriptedServer, ehlo: str) -> None:
    server.replies["EHLO"] = [ehlo]
    with pytest.raises(SmtpBroken, match="longer than") as broken:
        await connect(server)
    assert broken.value.stage == "ehlo"


async def test_a_malformed_greeting_is_an_error(server: ScriptedServer) -> None:
    server.replies["GREETING"] = ["hello there"]
    with pytest.raises(SmtpBroken, match="malformed reply") as broken:
        await connect(server)
    assert broken.value.stage == "connect"


@pytest.mark.parametrize(("hang_up", "stage"), [("MAIL", "mail"), ("RCPT", "rcpt"), ("BODY", "data")])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_server_that_hangs_up_mid_transaction(
    server: ScriptedServer, hang_up: str, stage: str, pipelining: bool
) -> None:
    if not pipelining:
        server.extensions.remove("PIPELINING")
    server.hang_up = [hang_up]
    session = await connect(server)
    big = b"x" * 998 + b"\r\n"
    with pytest.raises(SmtpBroken) as broken:
        await session.send("from@origin.test", "rcpt@session.test", body(big * 8000))  # 8 MB: more than buffers hold
    assert broken.value.stage == stage
    assert not session.usable
    assert server.messages == []


async def test_commands_with_line_ends_are_refused(server: ScriptedServer) -> None:
    session = await connect(server)
    for sender, recipient in [("a@b.test\r\nRSET", "r@session.test"), ("a@b.test", "r@session.test\nDATA")]:
        with pytest.raises(ValueError, match="CR or LF"):
            await session.send(sender, recipient, body())
    assert session.usable
    assert server.commands == ["EHLO client.test"]  # nothing went
    session.close()


async def test_addresses_go_as_utf8(server: ScriptedServer) -> None:
    session = await connect(server, source_ip="127.0.0.9")
    await session.send("josé@origin.test", "почта@испытание.test", body(), ["SMTPUTF8"])
    assert server.commands[1:3] == ["MAIL FROM:<josé@origin.test> SMTPUTF8", "RCPT TO:<почта@испытание.test>"]
    assert server.peers == ["127.0.0.9"]  # the source address was bound
    session.close()


# Through smtp_client.deliver: TLS policy, stages, the pool.


async def test_starttls_with_sni_and_the_outcome(server: ScriptedServer, ca: trustme.CA, contexts: TlsContexts) -> None:
    sni: list[str] = []
    server.tls = server_context(ca, sni)
    pool = ConnectionPool()
    accepted = await deliver(attempt(TlsPolicy(REQUIRED, contexts)), target(server), body, pool, None)
    assert accepted.response == "250 2.0.0 Ok: queued"
    assert accepted.tls.verified and accepted.tls.version in ("TLSv1.2", "TLSv1.3") and accepted.tls.cipher
    assert sni == [MX]  # the MX host's name, not its address
    assert server.commands[:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]
    assert server.messages[0].tls == accepted.tls.version
    (parked,) = [c for conns in pool._idle.values() for c in conns]
    assert outcome(parked.session) == accepted.tls
    await pool.close_all()


async def test_required_tls_without_starttls_is_deferred(
    server: ScriptedServer, contexts: TlsContexts, pool: ConnectionPool
) -> None:
    with pytest.raises(DeliveryError, match="does not offer STARTTLS") as error:
        await deliver(attempt(TlsPolicy(REQUIRED, contexts)), target(server), body, pool, None)
    assert error.value.category == "tls"
    assert server.messages == []


async def test_opportunistic_tls_takes_an_untrusted_certificate_unverified(
    server: ScriptedServer, contexts: TlsContexts, pool: ConnectionPool
) -> None:
    server.tls = server_context(trustme.CA(), [])  # a CA nobody trusts
    policy = TlsPolicy(OPPORTUNISTIC, contexts)
    with pytest.raises(DeliveryError, match="certificate verify failed"):
        await deliver(attempt(TlsPolicy(REQUIRED, contexts)), target(server), body, pool, None)
    accepted = await deliver(attempt(policy), target(server), body, pool, None)
    assert accepted.tls.version.startswith("TLSv1.") and not accepted.tls.verified
    assert contexts.unverifiable(f"{MX}[127.0.0.1]:{server.port}")


async def test_a_refused_starttls_falls_back_to_plain_text(
    server: ScriptedServer, ca: trustme.CA, pool: ConnectionPool
) -> None:
    server.tls = server_context(ca, [])
    server.replies["STARTTLS"] = ["454 4.7.0 TLS not available"]
    accepted = await deliver(attempt(TlsPolicy(OPPORTUNISTIC, TlsContexts(None))), target(server), body, pool, None)
    assert str(accepted.tls) == "none"
    assert len(server.messages) == 1


async def test_stages_through_deliver(server: ScriptedServer, pool: ConnectionPool) -> None:
    policy = TlsPolicy(NONE, TlsContexts(None))
    server.replies["RCPT"] = ["550 5.1.1 No such user"]
    with pytest.raises(ReplyError) as refused:
        await deliver(attempt(policy), target(server), body, pool, None)
    assert (refused.value.stage, refused.value.code, refused.value.target.host) == ("rcpt", 550, MX)
    server.replies["MAIL"] = ["553 5.7.1 Sender refused"]
    with pytest.raises(ReplyError) as refused:
        await deliver(attempt(policy), target(server), body, pool, None)
    assert (refused.value.stage, refused.value.code) == ("mail", 553)
    assert server.messages == []
    # A failed transaction closes its connection (with QUIT).
    assert server.commands.count("QUIT") == 2


async def test_a_refused_greeting_is_a_reply_at_connect(server: ScriptedServer, pool: ConnectionPool) -> None:
    server.replies["GREETING"] = ["421 4.3.2 Too busy"]
    with pytest.raises(ReplyError) as refused:
        await deliver(attempt(TlsPolicy(NONE, TlsContexts(None))), target(server), body, pool, None)
    assert (refused.value.stage, refused.value.code, refused.value.text) == ("connect", 421, "4.3.2 Too busy")


async def test_one_connection_carries_two_messages(server: ScriptedServer) -> None:
    pool = ConnectionPool()
    policy = TlsPolicy(NONE, TlsContexts(None))
    for recipient in ("one@session.test", "two@session.test"):
        await deliver(attempt(policy, recipient), target(server), body, pool, None)
    assert [m.rcpt_to for m in server.messages] == [["one@session.test"], ["two@session.test"]]
    assert len(server.peers) == 1 and pool.reuses == 1
    await pool.close_all()
    assert server.commands.count("QUIT") == 1


async def test_a_parked_connection_dropped_at_mail_is_retried_on_a_new_one(server: ScriptedServer) -> None:
    pool = ConnectionPool()
    policy = TlsPolicy(NONE, TlsContexts(None))
    await deliver(attempt(policy), target(server), body, pool, None)
    server.hang_up = ["MAIL"]  # the parked connection is gone when the next MAIL arrives
    await deliver(attempt(policy), target(server), body, pool, None)
    assert len(server.messages) == 2 and len(server.peers) == 2
    await pool.close_all()


async def test_a_parked_connection_the_server_spoke_on_is_not_reused(server: ScriptedServer) -> None:
    pool = ConnectionPool()
    policy = TlsPolicy(NONE, TlsContexts(None))
    await deliver(attempt(policy), target(server), body, pool, None)
    (parked,) = [conn for conns in pool._idle.values() for conn in conns]
    assert parked.session.usable
    for writer in list(server._writers):
        writer.write(b"421 4.4.2 Idle too long\r\n")  # and no hang-up (yet)
    await eventually(
        lambda: not parked.session.usable, timeout=5, interval=0.01, what="the 421 to reach the parked connection"
    )
    await deliver(attempt(policy), target(server), body, pool, None)
    assert len(server.messages) == 2 and len(server.peers) == 2 and pool.reuses == 0
    with contextlib.suppress(Exception):
        await pool.close_all()
