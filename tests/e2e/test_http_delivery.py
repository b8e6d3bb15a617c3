"""Delivery to HTTP: a domain routed to a URL gets the message as a file upload."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from tests.support import Deployment, DeploymentFactory, eventually
from zmta_devtools.servers import free_port


class Receiver(BaseHTTPRequestHandler):
    """Answers with the status named by the recipient's local part ("s200@..."), and keeps the uploads."""

    uploads: ClassVar[list[EmailMessage]] = []
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else self._read_chunked()
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        form = email.message_from_bytes(head + body, policy=email.policy.HTTP)
        assert isinstance(form, EmailMessage)
        self.uploads.append(form)
        self.bodies.append(body)
        fields = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
        to = fields["to"].get_content().strip()
        status = int(to.split("@")[0][1:])
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def _read_chunked(self) -> bytes:
        data = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
                self.rfile.readline()
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.uploads.clear()
    Receiver.bodies.clear()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/incoming"
    server.shutdown()
    server.server_close()


async def test_http_delivery_outcomes(deploy: DeploymentFactory, sinks: dict, receiver: str) -> None:
    zone = {"domains": {"http.test": {"http_url": receiver}}, "defer_times": [60]}
    d: Deployment = await deploy({"zones": {"default": zone}, "bounce": {"dsn": False}}, senders={"default": 1})
    data = b"From: a@b.test\r\nSubject: to http\r\n\r\nline one\r\n.line two\r\n"
    for rcpt in ("s200@http.test", "s500@http.test", "s404@http.test"):
        await asyncio.to_thread(d.smtp_send, "a@b.test", [rcpt], data)
    await eventually(lambda: len(Receiver.uploads) == 3, what="three uploads")
    log_path = d.log_dir / "queue.log"
    outcomes = ('"event": "delivered"', '"event": "rejected"', '"event": "deferred"')
    await eventually(lambda: all(o in log_path.read_text() for o in outcomes), what="three outcomes logged")

    fields = {p.get_param("name", header="content-disposition"): p for p in Receiver.uploads[0].iter_parts()}
    assert fields["from"].get_content().strip() == "a@b.test"
    upload = fields["message"]
    assert (upload.get_filename() or "").endswith(".eml")
    assert upload.get_content_type() == "message/rfc822"
    # The file exactly as sent: between its part header and the closing boundary.
    boundary = Receiver.uploads[0].get_boundary()
    body = Receiver.bodies[0]
    start = body.index(b"\r\n\r\n", body.index(b'name="message"')) + 4
    raw = body[start : body.index(f"\r\n--{boundary}--".encode())]
    assert raw.startswith(b"Received: ")
    assert b"Subject: to http\r\n" in raw
    assert raw.endswith(b"\r\nline one\r\n.line two\r\n")  # no dot-stuffing over HTTP

    log = log_path.read_text()
    assert '"event": "delivered"' in log and "HTTP 200" in log
    assert '"event": "rejected"' in log and "HTTP 500" in log
    assert '"event": "deferred"' in log and "HTTP 404" in log
    assert sinks["127.0.0.2"].messages == []  # nothing went over SMTP
