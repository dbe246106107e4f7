"""An upstream that misbehaves below HTTP: written on raw sockets, so nothing tidies its faults.

Modes (one per server):

- `silent`: reads the request and never answers, not even headers.
- `close`: reads the request and closes the connection before any header.
- `reset`: answers 200 `text/event-stream`, sends `chunks` events, then resets
  the connection (RST, via SO_LINGER 0).
- `huge_event`: answers 200 `text/event-stream`, then one endless `data:` line
  (no blank line ever) up to `total` bytes.
- `huge_json`: answers 200 `application/json` with a body of `total` bytes.
- `huge_json_unsized`: the same without a Content-Length (the body ends at close).

Each connection is recorded; `closed_by_peer` is set when the gateway closes
its end, which is how tests see that the upstream socket was let go. A
connection takes the mode the server has when it arrives: `misbehave(mode)`
switches it for the next ones (one server can serve a module of tests).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass
class Connection:
    opened: float = field(default_factory=time.monotonic)
    request: bytes = b""
    sent: int = 0
    closed_by_peer: threading.Event = field(default_factory=threading.Event)
    closed_at: float | None = None


def sse_event(
    content: str | None = None, finish_reason: str | None = None, *, end: bytes = b"\n\n"
) -> bytes:
    """One `chat.completion.chunk` event as OpenAI frames it (UTF-8, as it is)."""
    delta = {} if content is None else {"content": content}
    body = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + end


class RawUpstream:
    def __init__(self, mode: str, *, chunks: int = 3, total: int = 50 * 1024 * 1024) -> None:
        self.mode = mode
        self.chunks = chunks
        self.total = total
        self.connections: list[Connection] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def misbehave(self, mode: str, *, chunks: int = 3) -> None:
        """From the next connection on, misbehave this way; forget earlier connections."""
        self.mode = mode
        self.chunks = chunks
        self.connections.clear()

    def __enter__(self) -> RawUpstream:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = Connection()
            self.connections.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read_request(self, conn: socket.socket, record: Connection) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                return False
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            piece = conn.recv(65536)
            if not piece:
                return False
            body += piece
        record.request = head + b"\r\n\r\n" + body
        return True

    def _wait_for_peer_close(self, conn: socket.socket, record: Connection) -> None:
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                if conn.recv(65536) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self._peer_closed(record)

    def _peer_closed(self, record: Connection) -> None:
        if not record.closed_by_peer.is_set():
            record.closed_at = time.monotonic()
            record.closed_by_peer.set()

    def _send(self, conn: socket.socket, record: Connection, data: bytes) -> bool:
        try:
            conn.sendall(data)
        except OSError:
            self._peer_closed(record)
            return False
        record.sent += len(data)
        return True

    def _serve(self, conn: socket.socket, record: Connection) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if not self._read_request(conn, record):
                    return
            except OSError:
                return
            if self.mode == "silent":
                self._wait_for_peer_close(conn, record)
            elif self.mode == "close":
                return
            elif self.mode == "reset":
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
                self._send(conn, record, head)
                for i in range(self.chunks):
                    self._send(conn, record, sse_event(f"w{i} "))
                    time.sleep(0.02)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.mode == "huge_event":
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
                if not self._send(conn, record, head + b"data: "):
                    return
                piece = b"x" * CHUNK
                while record.sent < self.total and not self._stop.is_set():
                    if not self._send(conn, record, piece):
                        return
                self._wait_for_peer_close(conn, record)
            elif self.mode in ("huge_json", "huge_json_unsized"):
                length = b"content-length: " + str(self.total).encode() + b"\r\n"
                head = (
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + (length if self.mode == "huge_json" else b"connection: close\r\n")
                    + b"\r\n"
                )
                if not self._send(conn, record, head + b'{"x": "'):
                    return
                piece = b"x" * CHUNK
                left = self.total - 7 - 2
                while left > 0 and not self._stop.is_set():
                    step = min(left, CHUNK)
                    if not self._send(conn, record, piece[:step]):
                        return
                    left -= step
                self._send(conn, record, b'"}')
                if self.mode == "huge_json":
                    self._wait_for_peer_close(conn, record)
            else:
                raise ValueError(self.mode)
