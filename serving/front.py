"""The HTTP front: what every HTTP request to the default deployment passes before it reaches Triton.

Triton 2.51's own HTTP endpoint dies on an infer request whose JSON is nested about 40,000 levels deep,
lets a declared shape whose element count overflows 64 bits through to the python-backend stub (which it
kills), has no body-size limit, and serves the shared-memory, repository, logging and trace APIs. The
launcher therefore starts Triton's HTTP endpoint on a private loopback port, restricted to callers that
send a per-start secret header, and serves the public HTTP port from this front, which

- allows only the health, metadata, config, statistics and inference paths (403 for the others);
- bounds the header block and the body (431 / 413), and the time to send them (408: slowloris);
- for infer requests, bounds the JSON nesting depth of the JSON part before parsing it, then checks each
  input's declared shape against its data: element counts computed exactly (no overflow), byte sizes within
  the body limit, `binary_data_size` equal to shape x element size, the binary parts adding up to the body,
  JSON `data` holding exactly the declared number of elements (400 naming the input otherwise);
- refuses a header block with a bare LF or CR, or two Content-Length headers (400): Triton would drop the
  connection, or read another length than this front;
- checks the values of JSON `data`: integers within their type's range, finite floats (400 naming the input;
  Triton's parser would answer 500);
- answers not-ready (503) on the ready endpoints while the supervisor reloads a model whose stub died, and 503
  with Retry-After (not Triton's 500) for a request that reached a dead stub;
- answers 429 with Retry-After (busy, retry later) wherever Triton or a served model says busy: a full queue, a
  request that waited out the queue timeout, heavy requests filling their slots;
- names every infer request with a token (the request parameter contract.TOKEN_PARAMETER) and, when the client
  hangs up before the answer, writes the token into the cancel folder, where the front models see it and stop;
- answers 404 naming the new name for a model the project renamed (contract.RENAMED).

Everything else is relayed unchanged over one keep-alive upstream connection per client connection.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from biva_core.contract import BUSY_PREFIX, RENAMED, RETRY_AFTER_S, TOKEN_PARAMETER

DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
               "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
ALLOWED_PATH = re.compile(rb"^/v2(/health/(live|ready)|/models/stats|/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?"
                          rb"(/ready|/config|/stats|/infer)?)?/?$")
READY_PATH = re.compile(rb"^/v2(/health/ready|/models/([A-Za-z0-9_.-]+)(/versions/[0-9]+)?/ready)/?$")
HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"upgrade",
               b"proxy-connection", b"te", b"trailer", b"expect"}
STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required",
           413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 503: "Service Unavailable"}


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
    cancel_dir: str | None = None  # where abandoned requests' tokens go (contract.CANCEL_DIR_ENV); None: no tokens
    max_open_streams: int = 64  # gRPC: ModelStreamInfer streams open at once (the rest of the RPC limit stays free)
    stream_idle_s: float = 30.0  # gRPC: a stream that sends nothing for this long is ended


INT_RANGES = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64, "UINT8": -8, "UINT16": -16, "UINT32": -32,
              "UINT64": -64}  # bits; negative: unsigned
BUSY_MARKS = (b"Exceeds maximum queue size", b"Request timeout expired", BUSY_PREFIX.encode())


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


class Refused(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


def json_depth(text: bytes) -> int:
    """Deepest nesting of [ and { outside strings (vectorised: no recursion, no per-byte Python)."""
    a = np.frombuffer(STRINGS.sub(b"", text), np.uint8)
    if not a.size:
        return 0
    step = np.isin(a, (ord("["), ord("{"))).astype(np.int64) - np.isin(a, (ord("]"), ord("}")))
    return int(np.cumsum(step).max())


def _leaves(data) -> list:
    out, stack = [], [data]
    while stack:
        d = stack.pop()
        if isinstance(d, list):
            stack.extend(d)
        else:
            out.append(d)
    return out


def check_values(name: str, dtype: str, values: list) -> None:
    """Refused(400) unless JSON values fit their type: integers within its range, finite floats (Triton's JSON
    parser answers 500 "Unable to parse 'data'" otherwise)."""
    bits = INT_RANGES.get(dtype)
    for v in values:
        if bits is not None:
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bits > 0 else (0, 2 ** -bits - 1)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise Refused(400, f"input {name}: value {str(v)[:40]} is not an integer in {dtype}'s range "
                                   f"{lo}..{hi}")
        elif dtype in ("FP16", "FP32", "FP64", "BF16"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise Refused(400, f"input {name}: value {str(v)[:40]} is not a finite number")


def check_tensor(name: str, shape, dtype: str, limit: int, source: str, *, nbytes: int | None = None,
                 values: int | None = None) -> int:
    """Bytes an input's declared `shape` of `dtype` holds, computed exactly (Python integers: a shape whose element
    count overflows 64 bits cannot wrap to 0); Refused(400) naming the input, the shape and what was expected
    unless the shape is at most 8 integers >= 0, within `limit` bytes, and matches the data that came with it:
    `nbytes` bytes (checked for fixed-size types) or `values` values, as found in `source`. Both fronts' check."""
    name = str(name)[:64]
    if (not isinstance(shape, (list, tuple)) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise Refused(400, f"input {name}: shape must be a list of at most 8 integers >= 0, got {str(shape)[:80]}")
    shape = list(shape)
    elements = int(np.prod(shape, dtype=object)) if shape else 1
    size = elements * DTYPE_BYTES.get(dtype, 1)
    if size > limit:
        raise Refused(400, f"input {name}: shape {shape} declares {size} bytes, more than the body limit of {limit}")
    if nbytes is not None and dtype in DTYPE_BYTES and nbytes != size:
        raise Refused(400, f"input {name}: {source} is {nbytes} bytes but shape {shape} of {dtype} is {size} bytes")
    if values is not None and values != elements:
        raise Refused(400, f"input {name}: {source} holds {values} values, shape {shape} declares {elements}")
    return size


def check_caps(model: str, declared: list[tuple[str, int]], cfg: FrontConfig) -> None:
    """Refused(400) when the inputs' declared bytes ([(name, bytes)]) exceed what the model's caps allow (nothing
    that large reaches the stub's memory)."""
    limit = (cfg.model_bytes or {}).get(model)
    total = sum(size for _, size in declared)
    if limit is not None and total > 2 * limit + 4096:
        names = ", ".join(name[:32] for name, _ in declared)
        raise Refused(400, f"{model}: inputs {names} declare {total} bytes, more than the model's caps allow ({limit})")


def _check_input(inp, limit: int) -> tuple[str, int, int]:
    """(name, declared bytes, bytes of the binary part: 0 for JSON data) of one JSON input; Refused on any lie."""
    if not isinstance(inp, dict):
        raise Refused(400, "inputs: each input must be a JSON object")
    name, shape, dtype = str(inp.get("name"))[:64], inp.get("shape"), inp.get("datatype")
    params = inp.get("parameters") or {}
    binary = params.get("binary_data_size") if isinstance(params, dict) else None
    if binary is not None:
        if not isinstance(binary, int) or isinstance(binary, bool) or binary < 0:
            raise Refused(400, f"input {name}: binary_data_size must be an integer >= 0")
        return name, check_tensor(name, shape, dtype, limit, "binary_data_size", nbytes=binary), binary
    if "data" not in inp:
        raise Refused(400, f"input {name}: no data and no binary_data_size")
    values = _leaves(inp["data"])
    size = check_tensor(name, shape, dtype, limit, "data", values=len(values))
    check_values(name, str(dtype), values)
    return name, size, 0


def check_infer(body: bytes, header_length: bytes | None, cfg: FrontConfig, model: str = "") -> tuple[dict, int]:
    """Refused(400) unless the infer body's JSON part is shallow, every declared shape matches its data, and the
    declared tensors fit in what the model's caps allow (nothing that large reaches the stub's memory). Returns
    the JSON part, parsed, and its length."""
    try:
        n = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise Refused(400, "Inference-Header-Content-Length must be an integer") from None
    if not 0 <= n <= len(body):
        raise Refused(400, f"Inference-Header-Content-Length {n} outside the body of {len(body)} bytes")
    head = body[:n]
    depth = json_depth(head)
    if depth > cfg.max_json_depth:
        raise Refused(400, f"request JSON nests {depth} levels, more than {cfg.max_json_depth}")
    try:
        req = json.loads(head)
    except (ValueError, RecursionError):
        raise Refused(400, "request body is not valid JSON") from None
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list):
        raise Refused(400, "request JSON has no list of inputs")
    checked = [_check_input(inp, cfg.max_body_bytes) for inp in inputs]
    check_caps(model, [(name, size) for name, size, _ in checked], cfg)
    binary = sum(b for _, _, b in checked)
    if n + binary != len(body):
        raise Refused(400, f"body is {len(body)} bytes, the JSON part and binary_data_size values add up to "
                           f"{n + binary}")
    return req, n


def with_token(req: dict, n: int, body: bytes, raw: list[bytes], token: str) -> tuple[bytes, list[bytes]]:
    """The infer body with the token among its request parameters, and the header lines with the JSON part's new
    length (unchanged when the request's parameters are not an object: such a request gets no token)."""
    params = req.setdefault("parameters", {})
    if not isinstance(params, dict):
        return body, raw
    params[TOKEN_PARAMETER] = token
    head = json.dumps(req, separators=(",", ":")).encode()
    raw = [ln for ln in raw if ln.partition(b":")[0].strip().lower() != b"inference-header-content-length"]
    if n < len(body):  # binary parts follow the JSON part
        raw.append(b"Inference-Header-Content-Length: " + str(len(head)).encode())
    return head + body[n:], raw


# ---- HTTP plumbing --------------------------------------------------------------------------------


def _response(status: int, message: str, close: bool) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
            ).encode() + body


async def _read_head(reader: asyncio.StreamReader, limit: int, timeout: float) -> bytes | None:
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise Refused(400, "incomplete request head", close=True) from None
        return None
    except asyncio.LimitOverrunError:
        raise Refused(431, f"request head over {limit} bytes", close=True) from None
    except asyncio.TimeoutError:
        raise Refused(408, "request head not received in time", close=True) from None


def _parse_head(head: bytes) -> tuple[bytes, bytes, dict[bytes, bytes], list[bytes]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise Refused(400, "malformed request line", close=True)
    headers, raw = {}, []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise Refused(400, "malformed header line", close=True)
        if b"\n" in line or b"\r" in line:
            raise Refused(400, f"header {name.strip()[:40].decode(errors='replace')}: a bare LF or CR; lines end "
                               "with CRLF", close=True)
        key = name.strip().lower()
        if key in headers and key in (b"content-length", b"inference-header-content-length", b"transfer-encoding"):
            raise Refused(400, f"header {key.decode()} given twice; send it once", close=True)
        headers[key] = value.strip()
        if key not in HOP_HEADERS:
            raw.append(line)
    return parts[0], parts[1], headers, raw


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes], cfg: FrontConfig) -> bytes:
    if b"transfer-encoding" in headers:
        raise Refused(411, "chunked request bodies are not accepted; send Content-Length", close=True)
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise Refused(400, "Content-Length must be an integer", close=True) from None
    if length < 0 or length > cfg.max_body_bytes:
        raise Refused(413, f"body of {length} bytes, the limit is {cfg.max_body_bytes}", close=True)
    try:
        return await asyncio.wait_for(reader.readexactly(length), cfg.body_timeout_s)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError):
        raise Refused(408, "request body not received in time", close=True) from None


async def _read_upstream(up: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response from Triton: (head, body), the body de-chunked if it was chunked."""
    head = await up.readuntil(b"\r\n\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])}
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await up.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await up.readexactly(size + 2))
            if size == 0:
                break
        return head, b"".join(p[:-2] for p in parts)
    return head, await up.readexactly(int(fields.get(b"content-length", b"0")))


def _relay_head(head: bytes, body: bytes, close: bool) -> bytes:
    """Triton's response head for the client: busy answers as 429 with Retry-After, a dead stub's 500 as 503."""
    lines = head[:-4].split(b"\r\n")
    status, extra = lines[0], []
    code = status.split(b" ")[1] if len(status.split(b" ")) > 1 else b""
    if code in (b"503", b"500") and any(m in body for m in BUSY_MARKS):
        status, extra = b"HTTP/1.1 429 Too Many Requests", [b"Retry-After: %d" % RETRY_AFTER_S]
    elif code == b"500" and b"is not healthy" in body:  # a stub died: the supervisor is reloading it
        status, extra = b"HTTP/1.1 503 Service Unavailable", [b"Retry-After: 2"]
    keep = [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() not in HOP_HEADERS] + extra
    keep += [b"Content-Length: " + str(len(body)).encode(), b"Connection: " + (b"close" if close else b"keep-alive")]
    return b"\r\n".join([status, *keep]) + b"\r\n\r\n"


class Front:
    """The asyncio server on the public HTTP port. `not_ready(model or None)` comes from the supervisor."""

    def __init__(self, cfg: FrontConfig, not_ready: Callable[[str | None], bool]):
        self.cfg, self.not_ready = cfg, not_ready
        self.connections = 0

    async def serve(self, host: str, port: int) -> asyncio.base_events.Server:
        return await asyncio.start_server(self._client, host, port, limit=self.cfg.max_header_bytes,
                                          reuse_address=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.connections += 1
        try:
            if self.connections > self.cfg.max_connections:
                raise Refused(503, "too many connections", close=True)
            while True:
                close, up = await self._one(reader, writer, up)
                if close:
                    break
        except Refused as e:
            writer.write(_response(e.status, str(e), True))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.connections -= 1
            for w in (writer, up[1] if up else None):
                if w is not None:
                    w.close()

    async def _one(self, reader, writer, up):
        """Serve one request; returns (close the connection, upstream connection)."""
        head = await _read_head(reader, self.cfg.max_header_bytes, self.cfg.header_timeout_s)
        if head is None:
            return True, up
        method, target, headers, raw = _parse_head(head)
        if method not in (b"GET", b"POST"):
            raise Refused(405, f"method {method.decode(errors='replace')[:16]} not allowed", close=True)
        if headers.get(b"expect", b"").lower() == b"100-continue":  # curl's large bodies wait for this
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, headers, self.cfg)
        close = headers.get(b"connection", b"").lower() == b"close"
        path = target.split(b"?", 1)[0]
        try:
            infer = self._admit(method, path, body, headers)
        except Refused as e:
            writer.write(_response(e.status, str(e), close or e.close))
            await writer.drain()
            return close or e.close, up
        token = new_token() if infer is not None and self.cfg.cancel_dir else None
        if token:
            body, raw = with_token(*infer, body, raw, token)
        request = b"\r\n".join([method + b" " + target + b" HTTP/1.1", *raw, b"Host: 127.0.0.1", self.cfg.secret_header,
                                b"Content-Length: " + str(len(body)).encode()]) + b"\r\n\r\n" + body
        up, answer = await self._forward(reader, up, request, token)
        if answer is None:  # the client hung up (its request is marked abandoned), or Triton closed the connection
            if not reader.at_eof():
                writer.write(_response(502, "the server closed the connection", True))
            return True, up
        rhead, rbody = answer
        if b" 500 " in rhead.split(b"\r\n", 1)[0] + b" " and b"is not healthy" in rbody:
            self.not_ready(None)  # the supervisor looks at the stubs now, not at its next poll
        writer.write(_relay_head(rhead, rbody, close) + rbody)
        await writer.drain()
        return close, up

    async def _forward(self, reader, up, request: bytes, token: str | None):
        """(upstream connection, Triton's (head, body)); the answer is None when the client hung up first (then its
        token is marked abandoned and the upstream connection dropped) or Triton closed the connection twice."""
        for attempt in (0, 1):  # a kept-alive upstream connection Triton has since closed: once more, fresh
            reused = up is not None
            if up is None:
                up = await asyncio.open_connection("127.0.0.1", self.cfg.upstream_port, limit=1 << 20)
            try:
                up[1].write(request)
                await up[1].drain()
                answer = asyncio.ensure_future(_read_upstream(up[0]))
                while not (await asyncio.wait({answer}, timeout=0.2))[0]:
                    if reader.at_eof() or reader.exception() is not None:  # the client has gone
                        answer.cancel()
                        mark_abandoned(self.cfg.cancel_dir, token)
                        up[1].close()
                        return None, None
                return up, answer.result()
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                up[1].close()
                up = None
                if not reused or attempt:
                    return None, None
        return None, None

    def _admit(self, method: bytes, path: bytes, body: bytes, headers: dict[bytes, bytes]) -> tuple[dict, int] | None:
        """Refused unless the request may pass; for an infer request its JSON part and that part's length."""
        if not ALLOWED_PATH.match(path):
            raise Refused(403, f"{path.decode(errors='replace')[:80]} is not allowed on this port (the shared-memory, "
                               "repository, logging and trace APIs are closed)")
        parts = path.split(b"/")  # /v2/models/NAME/...
        model = parts[3].decode(errors="replace") if len(parts) > 3 and parts[2] == b"models" else None
        if model in RENAMED:
            raise Refused(404, f"model {model} is now {RENAMED[model]}")
        ready = READY_PATH.match(path)
        if ready and self.not_ready(ready.group(2).decode() if ready.group(2) else None):
            raise Refused(503, "not ready: a model is being reloaded after its backend process died")
        if method == b"POST" and path.endswith(b"/infer"):
            return check_infer(body, headers.get(b"inference-header-content-length"), self.cfg, model or "")
        return None
