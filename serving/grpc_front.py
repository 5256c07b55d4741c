"""The gRPC front: what every gRPC request to the default deployment passes before it reaches Triton (the
counterpart of front.py, the HTTP front).

Triton 2.51's gRPC endpoint accepts messages up to 2 GiB (INT32_MAX; no flag lowers it), and it passes a
declared shape whose element count overflows 64 bits ([2^62, 1, 28, 28] with empty raw contents: 2^62 x 784 x 4
bytes wraps to 0) on to the python-backend stub, which dies of it before model.py can answer. The launcher
therefore starts Triton's gRPC endpoint on a private loopback port where every protocol needs the per-start
secret (as the HTTP one), and serves the public gRPC port from this front (grpc.aio, in the launcher's event
loop beside the HTTP front), which

- refuses messages over the HTTP front's body limit (RESOURCE_EXHAUSTED, answered by gRPC itself);
- relays health, metadata, config and statistics, and refuses the shared-memory, repository, logging and
  trace RPCs (PERMISSION_DENIED);
- answers not ready on ServerReady / ModelReady while the supervisor reloads a model whose stub died;
- drains on SIGTERM with gRPC's graceful stop (GOAWAY: new calls go elsewhere; running ones finish);
- checks every ModelInfer request, and every message of a ModelStreamInfer stream, before forwarding it
  (validate.py, the HTTP front's checks on gRPC's fields, off the event loop for large messages);
  INVALID_ARGUMENT naming the input otherwise (a bad message ends its stream).

- bounds the ModelStreamInfer streams open at once (FrontConfig.max_open_streams: RESOURCE_EXHAUSTED beyond, so
  the rest of the RPC limit stays free for unary calls and health) and ends a stream whose client sends nothing for
  FrontConfig.stream_idle_s (DEADLINE_EXCEEDED); its upstream stream opens only with its first message;
- names every infer request with a token (the request parameter inflight.TOKEN_PARAMETER) and writes the token
  into the cancel folder when the client cancels or its deadline passes before the answer (Triton also marks the
  request cancelled: the front models see either).

Forwarded calls keep Triton's status codes and messages (a full queue stays UNAVAILABLE "Exceeds maximum
queue size", which clients read as busy), the client's deadline and metadata; a client that goes away cancels
its upstream call.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc
from tritonclient.grpc import service_pb2 as pb

from .front import DRAIN_MESSAGE, FrontConfig, InFlight, mark_abandoned, new_token
from .validate import Refused, Validator, parse

SERVICE = "/inference.GRPCInferenceService/"
RELAYED = ("ServerLive", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelStatistics")
CLOSED = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
          "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
          "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings")
DROPPED_METADATA = ("user-agent", "content-type", "te")
RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton reads --grpc-restricted-protocol's key from this header


class GrpcFront:
    """The grpc.aio server on the public gRPC port. `not_ready(model or None)` comes from the supervisor, as for
    the HTTP front; `secret` is the (key, value) given to Triton's --grpc-restricted-protocol."""

    def __init__(self, cfg: FrontConfig, upstream_port: int, secret: tuple[str, str],
                 not_ready: Callable[[str | None], bool]):
        self.cfg, self.not_ready = cfg, not_ready
        self.secret = (RESTRICTED_PREFIX + secret[0], secret[1])
        self.upstream = f"127.0.0.1:{upstream_port}"
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, Callable] = {}
        self.open_streams = 0
        self.draining = False
        self.in_flight: InFlight | None = None  # made in the event loop
        self.validator = Validator(cfg.limits)
        self._stopping: asyncio.Future | None = None

    async def serve(self, host: str, port: int) -> grpc.aio.Server:
        """Listen on host:port (OSError when it cannot) and relay to Triton's private port."""
        self.in_flight = InFlight()
        # Triton's gRPC port opens seconds after this channel exists; gRPC's default reconnect backoff (1 s, growing
        # to 120 s) failed calls fast ("failed to connect to all addresses") after readiness said 200
        self._channel = grpc.aio.insecure_channel(self.upstream, options=[
            ("grpc.max_send_message_length", self.cfg.max_body_bytes), ("grpc.max_receive_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500)])
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.cfg.max_body_bytes),
                                          ("grpc.so_reuseport", 0)],
                                 maximum_concurrent_rpcs=self.cfg.max_connections)
        server.add_generic_rpc_handlers((_Routes(self),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"cannot bind {address} (address already in use?)")
        await server.start()
        return server

    async def close(self, server: grpc.aio.Server) -> None:
        await server.stop(None)
        self.validator.close()
        if self._channel is not None:
            await self._channel.close()

    def _metadata(self, ctx: grpc.aio.ServicerContext) -> tuple:
        keep = [(k, v) for k, v in ctx.invocation_metadata() or ()
                if not k.startswith((":", "grpc-", RESTRICTED_PREFIX)) and k not in DROPPED_METADATA]
        return (*keep, self.secret)

    async def relay(self, method: str, raw: bytes, ctx: grpc.aio.ServicerContext, wait: bool = False) -> bytes:
        """One unary call forwarded as bytes; Triton's status and message come back unchanged. With `wait`, the call
        waits (within its deadline) for a connection to Triton rather than failing at once without one."""
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self._channel.unary_unary(SERVICE + method)
        try:
            return await call(raw, metadata=self._metadata(ctx), timeout=ctx.time_remaining(), wait_for_ready=wait)
        except grpc.aio.AioRpcError as e:
            await ctx.abort(e.code(), e.details() or "")

    def drain(self, server: grpc.aio.Server, grace: float) -> None:
        """From now on no new calls: gRPC's own graceful stop sends GOAWAY, so clients and balancers open their next
        call elsewhere (HAProxy retries a refused connection; it cannot retry a gRPC error, which travels as HTTP 200),
        and running calls finish within `grace` s. A call that slips in meanwhile gets UNAVAILABLE."""
        self.draining = True
        self._stopping = asyncio.ensure_future(server.stop(grace))

    async def _refuse_when_draining(self, ctx: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, DRAIN_MESSAGE)

    async def server_ready(self, raw: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        if self.draining or self.not_ready(None):
            return pb.ServerReadyResponse(ready=False).SerializeToString()
        return await self.relay("ServerReady", raw, ctx)

    async def model_ready(self, raw: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        try:
            name = parse(pb.ModelReadyRequest, raw).name
        except Refused as e:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.draining or self.not_ready(name):
            return pb.ModelReadyResponse(ready=False).SerializeToString()
        return await self.relay("ModelReady", raw, ctx)

    async def infer(self, raw: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        await self._refuse_when_draining(ctx)
        with self.in_flight:  # from admission on: a drain waits for it
            return await self._infer(raw, ctx)

    async def _infer(self, raw: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        token = new_token() if self.cfg.cancel_dir else None
        try:
            raw = await self.validator.grpc(raw, token)
        except Refused as e:
            await ctx.abort(_code(e), str(e))
        answered = False
        try:
            out = await self.relay("ModelInfer", raw, ctx, wait=True)
            answered = True
            return out
        finally:
            if not answered and (ctx.cancelled() or (ctx.time_remaining() or 1) <= 0):
                mark_abandoned(self.cfg.cancel_dir, token)

    async def stream_infer(self, requests, ctx: grpc.aio.ServicerContext):
        """ModelStreamInfer: at most max_open_streams at once; each message checked (and given a token) before it is
        written upstream; the first bad or late one ends the stream (INVALID_ARGUMENT / DEADLINE_EXCEEDED)."""
        await self._refuse_when_draining(ctx)
        if self.open_streams >= self.cfg.max_open_streams:
            await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.open_streams} streams are open, the limit "
                                                                "is " + str(self.cfg.max_open_streams))
        self.open_streams += 1
        tokens: list[str] = []
        try:
            first = await self._next(requests, ctx)
            if first is None:
                return
            call = self._channel.stream_stream(SERVICE + "ModelStreamInfer")(
                metadata=self._metadata(ctx), timeout=ctx.time_remaining(), wait_for_ready=True)
            ended: list[Refused] = []
            pump = asyncio.ensure_future(self._pump(first, requests, ctx, call, ended, tokens))
            try:
                with self.in_flight:
                    async for response in call:
                        yield response
            except grpc.aio.AioRpcError as e:
                await ctx.abort(e.code(), e.details() or "")
            except asyncio.CancelledError:  # grpc.aio raises this for an upstream call we cancelled
                if not ended:
                    raise
            finally:
                pump.cancel()
            if ended:
                await ctx.abort(_code(ended[0]), str(ended[0]))
        finally:
            self.open_streams -= 1
            if ctx.cancelled():
                for t in tokens:
                    mark_abandoned(self.cfg.cancel_dir, t)

    async def _next(self, requests, ctx) -> bytes | None:
        """The stream's next message within stream_idle_s; None at its end; DEADLINE_EXCEEDED when it is late."""
        try:
            return await asyncio.wait_for(requests.__anext__(), self.cfg.stream_idle_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            await ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the stream sent nothing for "
                                                              f"{self.cfg.stream_idle_s:g} s")

    async def _pump(self, raw: bytes, requests, ctx, call, ended: list[Refused], tokens: list[str]) -> None:
        try:
            while raw is not None:
                token = new_token() if self.cfg.cancel_dir else None
                raw = await self.validator.grpc(raw, token)
                if token:
                    tokens.append(token)
                await call.write(raw)
                try:
                    raw = await asyncio.wait_for(requests.__anext__(), self.cfg.stream_idle_s)
                except StopAsyncIteration:
                    raw = None
            await call.done_writing()
        except Refused as e:
            ended.append(e)
            call.cancel()
        except asyncio.TimeoutError:
            ended.append(Refused(408, f"the stream sent nothing for {self.cfg.stream_idle_s:g} s"))
            call.cancel()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the upstream call ended: its status reaches the client through the responses


def _code(e: Refused) -> grpc.StatusCode:
    """The gRPC status of a refusal by its HTTP status."""
    return {408: grpc.StatusCode.DEADLINE_EXCEEDED, 503: grpc.StatusCode.UNAVAILABLE}.get(
        e.status, grpc.StatusCode.INVALID_ARGUMENT)


class _Routes(grpc.GenericRpcHandler):
    """Method name -> handler; methods outside GRPCInferenceService get UNIMPLEMENTED from gRPC."""

    def __init__(self, front: GrpcFront):
        unary = grpc.unary_unary_rpc_method_handler
        self.routes = {SERVICE + m: unary(_relayer(front, m)) for m in RELAYED}
        self.routes.update({SERVICE + m: unary(_refuser(m)) for m in CLOSED})
        self.routes[SERVICE + "ServerReady"] = unary(front.server_ready)
        self.routes[SERVICE + "ModelReady"] = unary(front.model_ready)
        self.routes[SERVICE + "ModelInfer"] = unary(front.infer)
        self.routes[SERVICE + "ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(front.stream_infer)

    def service(self, handler_call_details):
        return self.routes.get(handler_call_details.method)


def _relayer(front: GrpcFront, method: str):
    async def relay(raw: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await front.relay(method, raw, ctx)

    return relay


def _refuser(method: str):
    async def refuse(raw: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not allowed on this port: the "
                                                            "shared-memory, repository, logging and trace APIs are "
                                                            "restricted")

    return refuse
