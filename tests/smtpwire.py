"""A raw SMTP client for tests that need to send what a polite client would not."""

from __future__ import annotations

import socket


class SmtpWire:
    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 30.0, source: str | None = None, greet: bool = True
    ) -> None:
        """Connect (from the loopback address ``source``, if given) and read the greeting
        (unless not ``greet``: then call :meth:`reply` for it)."""
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source or "", 0))
        self.buffer = b""
        self.greeting = self.reply() if greet else (0, "")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its lines joined by newlines."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got so far {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), "\n".join(x[4:] for x in lines)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SmtpWire:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
