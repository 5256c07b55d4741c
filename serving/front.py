"""The HTTP front: what every HTTP request to the default deployment passes before it reaches Triton.

Triton 2.51's own HTTP endpoint dies on an infer request whose JSON is nested about 40,000 levels deep, lets a
declared shape whose element count overflows 64 bits through to the python-backend stub (which it kills), has no
body-size limit, and serves the shared-memory, repository, logging and trace APIs. The launcher therefore starts
Triton's HTTP endpoint on a private loopback port, restricted to callers that send a per-start secret header, and
serves the public HTTP port from this front. HTTP/1.1 framing, both towards the client and towards Triton, is
h11's (the sans-IO parser under httpcore and uvicorn); this module owns the I/O, the timeouts and the policy:

- allows only the health, metadata, config, statistics and inference paths (403 for the others), GET and POST;
- bounds the request head and the body (431 / 413), and the time to send them (408: slowloris);
- refuses a request head with a bare LF (400): h11 accepts one as a line end, as RFC 9112 allows; we do not;
- checks every infer request (validate.py: shapes against data, caps, values, JSON depth) off the event loop for
  large bodies, so health and readiness answer within milliseconds whatever else arrives;
- answers not-ready (503) on the ready endpoints while the supervisor reloads a model whose stub died or while
  the replica drains, and 503 with Retry-After (not Triton's 500) for a request that reached a dead stub;
- answers 429 with Retry-After (busy, retry later) wherever Triton or a served model says busy;
- names every infer request with a token (the request parameter inflight.TOKEN_PARAMETER) and, when the client
  hangs up before the answer, writes the token into the cancel folder, where the front models see it and stop;
- drains on request (`drain()`, on SIGTERM): ready endpoints answer 503 at once, new infer requests 503 with
  Retry-After and `Connection: close` (a load balancer retries them on another replica), requests already
  forwarded finish; `idle()` tells when none is left.

Everything else is relayed over one keep-alive upstream connection per client connection.
"""
from __future__ import annotations

import asyncio
import http
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h11

from biva_core.contract import BUSY_PREFIX, RETRY_AFTER_S

from .validate import Limits, Refused, Validator

ALLOWED_PATH = re.compile(rb"^/v2(/health/(live|ready)|/models/stats|/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?"
                          rb"(/ready|/config|/stats|/infer)?)?/?$")
READY_PATH = re.compile(rb"^/v2(/health/ready|/models/([A-Za-z0-9_.-]+)(/versions/[0-9]+)?/ready)/?$")
HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"upgrade",
               b"proxy-connection", b"te", b"trailer", b"expect"}
BARE_LF = re.compile(rb"(?<!\r)\n")
BUSY_MARKS = (b"Exceeds maximum queue size", b"Request timeout expired", BUSY_PREFIX.encode())
DRAIN_MESSAGE = "this replica is shutting down; retry on another replica"
READ_BYTES = 1 << 16


@dataclass(frozen=True)
class FrontConfig:
    upstream_port: int  # Triton's private HTTP port on 127.0.0.1
    secret_header: bytes  # b"name: value", the header Triton's restricted APIs require
    max_body_bytes: int = 64 << 20  # a full request of the largest cap fits with room to spare
    max_header_bytes: int = 16 << 10
    max_json_depth: int = 32  # a request for a (B, C, H, W) tensor nests 6 deep
    header_timeout_s: float = 10.0  # to send the request line and headers
    body_timeout_s: float = 60.0  # to send the body
    max_connections: int = 512
    model_bytes: dict[str, int] | None = None  # model -> largest request its caps allow (ModelMeta)
    cancel_dir: str | None = None  # where abandoned requests' tokens go (inflight.CANCEL_DIR_ENV); None: no tokens
    max_open_streams: int = 64  # gRPC: ModelStreamInfer streams open at once (the rest of the RPC limit stays free)
    stream_idle_s: float = 30.0  # gRPC: a stream that sends nothing for this long is ended

    @property
    def limits(self) -> Limits:
        return Limits(self.max_body_bytes, self.max_json_depth, dict(self.model_bytes or {}))


def mark_abandoned(cancel_dir: str | None, token: str | None) -> None:
    """Write an abandoned request's token into the cancel folder (the front models stop it); tokens older than a
    few minutes are removed on the way."""
    if not cancel_dir or not token:
        return
    folder = Path(cancel_dir)
    (folder / token).touch()
    old = time.time() - 300
    for p in folder.iterdir():
        if p.name.isalnum() and len(p.name) == 16 and p.stat().st_mtime < old:
            p.unlink(missing_ok=True)


def new_token() -> str:
    return secrets.token_hex(8)


class InFlight:
    """Requests a front has forwarded and not yet answered; `idle()` waits until there are none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


@dataclass
class _Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # end-to-end headers, names lowercased
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _error(status: int, message: str, extra: list[tuple[bytes, bytes]] = ()) -> _Answer:
    return _Answer(status, [(b"content-type", b"application/json"), *extra], json.dumps({"error": message}).encode())


class _Upstream:
    """One keep-alive HTTP/1.1 connection to Triton's private port, framed by h11."""

    def __init__(self, port: int):
        self.port = port
        self.conn: h11.Connection | None = None
        self.reader = self.writer = None

    @property
    def open(self) -> bool:
        return self.conn is not None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.conn = self.reader = self.writer = None

    async def send(self, request: _Request, secret: tuple[bytes, bytes]) -> None:
        headers = [*request.headers, (b"host", b"127.0.0.1"), secret, (b"content-length", b"%d" % len(request.body))]
        data = self.conn.send(h11.Request(method=request.method, target=request.target, headers=headers))
        data += self.conn.send(h11.Data(data=request.body)) if request.body else b""
        self.writer.write(data + self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def receive(self) -> _Answer:
        """Triton's answer; ConnectionError when Triton closed the connection first."""
        head, parts = None, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_BYTES)
                if not data and head is None:
                    raise ConnectionError("Triton closed the connection")
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("Triton closed the connection mid-answer")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.close()
        headers = [(k, v) for k, v in head.headers if k not in HOP_HEADERS]
        return _Answer(head.status_code, headers, b"".join(parts))


def _relay(answer: _Answer) -> _Answer:
    """Triton's answer for the client: busy answers as 429 with Retry-After, a dead stub's 500 as 503."""
    if answer.status in (500, 503) and any(m in answer.body for m in BUSY_MARKS):
        return _Answer(429, [*answer.headers, (b"retry-after", b"%d" % RETRY_AFTER_S)], answer.body)
    if answer.status == 500 and b"is not healthy" in answer.body:  # a stub died: the supervisor is reloading it
        return _Answer(503, [*answer.headers, (b"retry-after", b"2")], answer.body)
    return answer


class _Client:
    """One client connection: h11 frames it; requests are read, checked and answered one at a time."""

    def __init__(self, front: Front, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.front, self.cfg, self.reader, self.writer = front, front.cfg, reader, writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.cfg.max_header_bytes)
        self.method = b""  # of the request being answered: a HEAD answer carries no body

    async def _read(self, deadline: float, what: str) -> bytes:
        """More bytes from the client before `deadline` (b"" when it closed); Refused(408) naming `what` after it."""
        try:
            return await asyncio.wait_for(self.reader.read(READ_BYTES), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise Refused(408, f"{what} not received in time", close=True) from None

    async def read_request(self) -> _Request | None:
        """The next request, or None when the client has gone (or an idle keep-alive connection timed out);
        Refused for what h11 or our limits reject."""
        deadline, head = time.monotonic() + self.cfg.header_timeout_s, bytearray(self.conn.trailing_data[0])
        event = self.conn.next_event()
        while event is h11.NEED_DATA:  # the head, within its size and time
            try:
                data = await self._read(deadline, "request head")
            except Refused:
                if not head:
                    return None
                raise
            if not data and not head:
                return None
            head += data
            self.conn.receive_data(data)
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                if head.find(b"\r\n\r\n") > self.cfg.max_header_bytes:  # too large first, whatever else is wrong
                    raise Refused(431, f"request head over {self.cfg.max_header_bytes} bytes", close=True) from None
                raise
            if event is h11.NEED_DATA and len(head) > self.cfg.max_header_bytes:
                raise Refused(431, f"request head over {self.cfg.max_header_bytes} bytes", close=True)
        if isinstance(event, h11.ConnectionClosed):
            return None
        head = bytes(head[:len(head) - len(self.conn.trailing_data[0])])
        if len(head) > self.cfg.max_header_bytes:
            raise Refused(431, f"request head over {self.cfg.max_header_bytes} bytes", close=True)
        lf = BARE_LF.search(head.rstrip(b"\r\n"))
        if lf:
            line = head[:lf.start()].rsplit(b"\n", 1)[-1].partition(b":")[0]
            raise Refused(400, f"header {line.strip()[:40].decode(errors='replace')}: a bare LF; lines end with CRLF",
                          close=True)
        self.method = event.method
        if event.method not in (b"GET", b"POST"):
            raise Refused(405, f"method {event.method.decode(errors='replace')[:16]} not allowed", close=True)
        length = next((v for k, v in event.headers if k == b"content-length"), None)
        if length is not None and int(length) > self.cfg.max_body_bytes:
            raise Refused(413, f"body of {int(length)} bytes, the limit is {self.cfg.max_body_bytes}", close=True)
        if self.conn.they_are_waiting_for_100_continue:  # curl's large bodies wait for this
            self.writer.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
        body = await self._body(time.monotonic() + self.cfg.body_timeout_s)
        return _Request(event.method, event.target, [(k, v) for k, v in event.headers if k not in HOP_HEADERS], body)

    async def _body(self, deadline: float) -> bytes:
        parts, size = [], 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self._read(deadline, "request body"))
                continue
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if isinstance(event, h11.ConnectionClosed):
                raise Refused(408, "request body not received in time", close=True)
            size += len(event.data)
            if size > self.cfg.max_body_bytes:
                raise Refused(413, f"body over {self.cfg.max_body_bytes} bytes, the limit", close=True)
            parts.append(bytes(event.data))

    async def answer(self, answer: _Answer, close: bool = False) -> bool:
        """Send the answer; True when the connection must close after it."""
        if close or self.front.draining:
            answer.headers.append((b"connection", b"close"))
        headers = [*answer.headers, (b"content-length", b"%d" % len(answer.body))]
        try:
            data = self.conn.send(h11.Response(status_code=answer.status, headers=headers, reason=_reason(answer.status)))
            data += self.conn.send(h11.Data(data=answer.body)) if answer.body else b""
            data += self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return True
        self.writer.write(data)
        await self.writer.drain()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return False
        return True

    def refusal(self, e: Refused) -> bytes:
        """The bytes of a refusal that closes the connection (h11 lets a server answer a request it could not
        read); b"" when a response is already under way."""
        body = json.dumps({"error": str(e)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                   (b"connection", b"close")]
        try:
            data = self.conn.send(h11.Response(status_code=e.status, headers=headers, reason=_reason(e.status)))
            data += b"" if self.method == b"HEAD" else self.conn.send(h11.Data(data=body))
            return data + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return b""


class Front:
    """The asyncio server on the public HTTP port. `not_ready(model or None)` comes from the supervisor."""

    def __init__(self, cfg: FrontConfig, not_ready: Callable[[str | None], bool]):
        self.cfg, self.not_ready = cfg, not_ready
        self.connections = 0
        self.draining = False
        self.in_flight: InFlight | None = None  # made in the event loop
        self.validator = Validator(cfg.limits)
        self._writers: set[asyncio.StreamWriter] = set()
        self.secret = tuple(p.strip().lower() if i == 0 else p.strip()
                            for i, p in enumerate(cfg.secret_header.split(b":", 1)))

    async def serve(self, host: str, port: int) -> asyncio.base_events.Server:
        self.in_flight = InFlight()
        return await asyncio.start_server(self._client, host, port, limit=self.cfg.max_header_bytes,
                                          reuse_address=True)

    def drain(self) -> None:
        """From now on: not ready, new infer requests refused with 503 (retry elsewhere); forwarded ones finish."""
        self.draining = True

    def close_connections(self) -> None:
        """Close every client connection (and with it its upstream one: Triton waits for open ones at exit)."""
        for writer in list(self._writers):
            writer.close()
        self.validator.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client, up = _Client(self, reader, writer), _Upstream(self.cfg.upstream_port)
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.connections > self.cfg.max_connections:
                raise Refused(503, "too many connections", close=True)
            while True:
                request = await client.read_request()
                if request is None or await self._one(client, up, request):
                    break
        except Refused as e:
            writer.write(client.refusal(e))
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint >= 400 else 400
            writer.write(client.refusal(Refused(status, f"malformed request: {str(e).lower()}")))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            up.close()
            writer.close()

    async def _one(self, client: _Client, up: _Upstream, request: _Request) -> bool:
        """Serve one request; True when the connection must close."""
        close = request.header(b"connection") == b"close"
        token = None
        with self.in_flight:  # from admission on: a drain waits for it
            try:
                model = self._admit(request)
                if model is not None:  # an infer request
                    token = new_token() if self.cfg.cancel_dir else None
                    request.body = await self._checked(request, model, token)
            except Refused as e:
                extra = [(b"retry-after", b"1")] if e.status == 503 else []
                return await client.answer(_error(e.status, str(e), extra), close or e.close)
            answer = await self._forward(client, up, request, token)
        if answer is None:  # the client hung up (its request is marked abandoned), or Triton closed twice
            if not client.reader.at_eof():
                await client.answer(_error(502, "the server closed the connection"), True)
            return True
        return await client.answer(_relay(answer), close)

    async def _checked(self, request: _Request, model: str, token: str | None) -> bytes:
        """The infer body, checked (off the loop when large) and named with the token."""
        length = request.header(b"inference-header-content-length")
        try:
            n = int(length) if length is not None else None
        except ValueError:
            raise Refused(400, "Inference-Header-Content-Length must be an integer") from None
        body, n = await self.validator.http(request.body, n, model, token)
        request.headers = [(k, v) for k, v in request.headers if k != b"inference-header-content-length"]
        if n is not None:
            request.headers.append((b"inference-header-content-length", b"%d" % n))
        return body

    async def _forward(self, client: _Client, up: _Upstream, request: _Request, token: str | None) -> _Answer | None:
        """Triton's answer; None when the client hung up first (its token is marked abandoned and the upstream
        connection dropped) or Triton closed the connection twice."""
        for attempt in (0, 1):  # a kept-alive upstream connection Triton has since closed: once more, fresh
            reused = up.open
            try:
                if not up.open:
                    await up.connect()
                await up.send(request, self.secret)
                answer = asyncio.ensure_future(up.receive())
                while not (await asyncio.wait({answer}, timeout=0.2))[0]:
                    if client.reader.at_eof() or client.reader.exception() is not None:  # the client has gone
                        answer.cancel()
                        mark_abandoned(self.cfg.cancel_dir, token)
                        up.close()
                        return None
                return answer.result()
            except (ConnectionError, h11.ProtocolError, OSError):
                up.close()
                if not reused or attempt:
                    return None
        return None

    def _admit(self, request: _Request) -> str | None:
        """Refused unless the request may pass; the model's name for an infer request, else None."""
        path = request.target.split(b"?", 1)[0]
        if not ALLOWED_PATH.match(path):
            raise Refused(403, f"{path.decode(errors='replace')[:80]} is not allowed on this port (the shared-memory, "
                               "repository, logging and trace APIs are closed)")
        parts = path.split(b"/")  # /v2/models/NAME/...
        model = parts[3].decode(errors="replace") if len(parts) > 3 and parts[2] == b"models" else None
        ready = READY_PATH.match(path)
        if ready and self.draining:
            raise Refused(503, "not ready: " + DRAIN_MESSAGE)
        if ready and self.not_ready(ready.group(2).decode() if ready.group(2) else None):
            raise Refused(503, "not ready: a model is being reloaded after its backend process died")
        if request.method == b"POST" and path.rstrip(b"/").endswith(b"/infer"):
            if self.draining:
                raise Refused(503, DRAIN_MESSAGE, close=True)
            return model or ""
        return None
