"""The infer checks both fronts share, and where they run.

Triton 2.51 dies on an infer request whose JSON is nested about 40,000 levels deep, passes a declared shape whose
element count overflows 64 bits to the python-backend stub (which it kills), and answers 500 for JSON values
outside their type. Before a front forwards an infer request, `http_infer` (HTTP) or `grpc_infer` (gRPC):

- bounds the JSON nesting depth of the JSON part before parsing it (HTTP);
- checks each input's declared shape against its data: element counts computed exactly (no overflow), byte sizes
  within the body limit, `binary_data_size` equal to shape x element size, the binary parts adding up to the body,
  JSON `data` or gRPC typed contents holding exactly the declared number of elements;
- checks the values of JSON `data` and gRPC float contents: integers within their type's range, finite floats;
- refuses inputs whose declared bytes exceed what the model's caps allow (nothing that large reaches a stub);
- names the request with its token (the request parameter inflight.TOKEN_PARAMETER).

Every refusal is `Refused(status, one line naming the input and what was expected)`.

Where: parsing and checking a large body is CPU work in C (json.loads, protobuf) and in Python (the per-value
loops) that holds the GIL for a second or more per 47 MB body, so it must not run in the process whose event loop
answers health and readiness. `Validator` checks bodies up to INLINE_BYTES on the loop (microseconds) and larger
ones in a worker process (a spawned process pool: the fronts' process already runs gRPC threads, which fork must
not copy). The functions here take and return plain bytes and a picklable `Limits`, so either place runs them.
"""
from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from biva_core.contract import KS, SAMPLES, WIRE_TYPES, ModelMeta
from biva_core.inflight import TOKEN_PARAMETER

DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
               "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
INT_RANGES = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64, "UINT8": -8, "UINT16": -16, "UINT32": -32,
              "UINT64": -64}  # bits; negative: unsigned
STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
TYPED = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)  # bool_contents, ..., bytes_contents
INLINE_BYTES = 256 << 10  # bodies up to this are checked on the event loop (well under a millisecond)


class Refused(Exception):
    """A request the fronts refuse: its HTTP status (the gRPC front maps it), a one-line message, and whether the
    HTTP connection must close after the answer."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close

    def __reduce__(self):  # raised in the worker process, re-raised in the front
        return Refused, (self.status, str(self), self.close)


@dataclass(frozen=True)
class Limits:
    """What the checks allow: the body limit, the JSON depth, and each model's largest request (ModelMeta)."""

    max_body_bytes: int = 64 << 20
    max_json_depth: int = 32  # a request for a (B, C, H, W) tensor nests 6 deep
    model_bytes: dict[str, int] = field(default_factory=dict)  # model -> largest request its caps allow


# the contract's dtypes (TensorSpec.dtype) in bytes per element; "bytes": an estimator name, at most 16
ITEM_BYTES = {**{d: DTYPE_BYTES[WIRE_TYPES[d]] for d in ("float32", "int64", "bool")}, "bytes": 16}


def model_bytes(meta: ModelMeta) -> dict[str, int]:
    """model -> bytes of the largest request its caps allow (every input at its largest), so a front can refuse a
    larger declared size before anything is allocated (Limits.model_bytes)."""
    out = {}
    for name, spec in meta.front_specs().items():  # a free dimension is rows (images, z) or, alone, the ks
        free = lambda t: meta.caps.max_images if len(t.dims) > 1 else meta.n_layers + 1  # noqa: E731
        out[name] = sum(ITEM_BYTES[t.dtype] * math.prod(free(t) if d < 0 else d for d in t.dims)
                        for t in spec.inputs)
    free = {SAMPLES: 1, KS: meta.n_layers + 1}  # rows x samples <= the graph's max batch; J <= L + 1
    for name, spec in meta.graph_specs().items():
        row = lambda t: math.prod([d for d in t.dims if d > 0] + [free[a] for a in t.free])  # noqa: E731
        out[name] = sum(ITEM_BYTES[t.dtype] * meta.graph_max_batch * row(t) for t in spec.inputs)
    return out

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


def check_values(name: str, dtype: str, values) -> None:
    """Refused(400) unless values fit their type: integers within its range, finite floats (Triton's JSON parser
    answers 500 "Unable to parse 'data'" otherwise)."""
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
    `nbytes` bytes (checked for fixed-size types) or `values` values, as found in `source`."""
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


def check_caps(model: str, declared: list[tuple[str, int]], limits: Limits) -> None:
    """Refused(400) when the inputs' declared bytes ([(name, bytes)]) exceed what the model's caps allow."""
    limit = limits.model_bytes.get(model)
    total = sum(size for _, size in declared)
    if limit is not None and total > 2 * limit + 4096:
        names = ", ".join(name[:32] for name, _ in declared)
        raise Refused(400, f"{model}: inputs {names} declare {total} bytes, more than the model's caps allow ({limit})")


def _check_json_input(inp, limit: int) -> tuple[str, int, int]:
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


def check_json_infer(body: bytes, header_length: int | None, limits: Limits, model: str) -> tuple[dict, int]:
    """Refused(400) unless the HTTP infer body's JSON part is shallow, every declared shape matches its data, and
    the declared tensors fit in what the model's caps allow. Returns the JSON part, parsed, and its length."""
    n = len(body) if header_length is None else header_length
    if not 0 <= n <= len(body):
        raise Refused(400, f"Inference-Header-Content-Length {n} outside the body of {len(body)} bytes")
    head = body[:n]
    depth = json_depth(head)
    if depth > limits.max_json_depth:
        raise Refused(400, f"request JSON nests {depth} levels, more than {limits.max_json_depth}")
    try:
        req = json.loads(head)
    except (ValueError, RecursionError):
        raise Refused(400, "request body is not valid JSON") from None
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list):
        raise Refused(400, "request JSON has no list of inputs")
    checked = [_check_json_input(inp, limits.max_body_bytes) for inp in inputs]
    check_caps(model, [(name, size) for name, size, _ in checked], limits)
    binary = sum(b for _, _, b in checked)
    if n + binary != len(body):
        raise Refused(400, f"body is {len(body)} bytes, the JSON part and binary_data_size values add up to "
                           f"{n + binary}")
    return req, n


def http_infer(body: bytes, header_length: int | None, limits: Limits, model: str,
               token: str | None) -> tuple[bytes, int | None]:
    """The checked HTTP infer body with the token among its request parameters, and the new length of its JSON
    part (None: no binary parts follow it). A request whose parameters are not an object gets no token."""
    req, n = check_json_infer(body, header_length, limits, model)
    params = req.setdefault("parameters", {})
    if token is None or not isinstance(params, dict):
        return body, (n if n < len(body) else None)
    params[TOKEN_PARAMETER] = token
    head = json.dumps(req, separators=(",", ":")).encode()
    return head + body[n:], (len(head) if n < len(body) else None)


def parse(message_type, raw: bytes):
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise Refused(400, f"the message is not a {message_type.__name__}") from None


def check_grpc_infer(req: pb.ModelInferRequest, limits: Limits) -> None:
    """Refused unless every input's declared shape matches its raw or typed contents and the inputs' declared bytes
    fit within the body limit and the model's caps (the HTTP checks, on gRPC's fields)."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise Refused(400, f"raw_input_contents holds {len(raw)} tensors for {len(req.inputs)} inputs")
    declared = []
    for i, inp in enumerate(req.inputs):
        if "shared_memory_region" in inp.parameters:
            raise Refused(400, f"input {inp.name[:64]}: shared-memory inputs are not accepted on this port")
        if raw:
            size = check_tensor(inp.name, list(inp.shape), inp.datatype, limits.max_body_bytes,
                                f"raw_input_contents[{i}]", nbytes=len(raw[i]))
        else:
            size = check_tensor(inp.name, list(inp.shape), inp.datatype, limits.max_body_bytes, "contents",
                                values=sum(len(getattr(inp.contents, f)) for f in TYPED))
            if inp.datatype.startswith(("FP", "BF")):  # typed ints come in their proto's range already
                for f in ("fp32_contents", "fp64_contents"):
                    values = np.asarray(getattr(inp.contents, f), np.float64)
                    bad = values[~np.isfinite(values)]
                    if bad.size:
                        raise Refused(400, f"input {inp.name[:64]}: value {bad[0]} is not a finite number")
        declared.append((inp.name, size))
    check_caps(req.model_name, declared, limits)


def grpc_infer(raw: bytes, limits: Limits, token: str | None) -> bytes:
    """The checked ModelInferRequest with the token among its parameters: a message holding only that parameter
    appended to the bytes (protobuf merges concatenated messages; a map's later entry wins), so the request is
    never serialised again."""
    check_grpc_infer(parse(pb.ModelInferRequest, raw), limits)
    if token is None:
        return raw
    extra = pb.ModelInferRequest()
    extra.parameters[TOKEN_PARAMETER].string_param = token
    return raw + extra.SerializeToString()


class Validator:
    """Runs `http_infer` / `grpc_infer` on the event loop for bodies up to INLINE_BYTES and in one worker process
    for larger ones (started at the first large body), so no body holds up health, readiness or the other
    protocol."""

    def __init__(self, limits: Limits, inline_bytes: int = INLINE_BYTES):
        self.limits, self.inline_bytes = limits, inline_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def _run(self, size: int, fn, *args):
        if size <= self.inline_bytes:
            return fn(*args)
        for attempt in (0, 1):
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
            except BrokenProcessPool:  # the worker was killed (out of memory?): a fresh one, once
                self._pool = None
                if attempt:
                    raise Refused(503, "the request could not be checked; retry later") from None

    async def http(self, body: bytes, header_length: int | None, model: str,
                   token: str | None) -> tuple[bytes, int | None]:
        return await self._run(len(body), http_infer, body, header_length, self.limits, model, token)

    async def grpc(self, raw: bytes, token: str | None) -> bytes:
        return await self._run(len(raw), grpc_infer, raw, self.limits, token)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
