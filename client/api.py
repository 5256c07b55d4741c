"""`BivaClient`: one typed call per request of the served API (biva_core.contract: names, caps, checks).

    client = BivaClient("127.0.0.1:8000", protocol="http")
    images = client.sample(n=16, seed=0)                       # (16, C, H, W) in [0, 1]
    bounds = client.score(x, seed=0, iw=8, ks=(1, 2))          # Scores: elbo, iw_bound, l_gt_k, kl
    client.close()

Each method sends exactly one request; splitting a data set into requests (and giving each its seed) is
`biva_client.tasks`'s job. Noise is drawn on the server from the request's seed, so the same seed and the
same inputs give the same numbers. Transient failures (a reset connection, gRPC UNAVAILABLE, HTTP 5xx) are
retried with exponential backoff, "busy" answers (HTTP 429, a full queue) after the Retry-After the server
names, until the request's timeout; a server that refuses the connection from the first try is reported after
about two seconds, with a hint to start it. Every failure reaches the caller as a `ClientError` subclass
with a one-line message and the process exit code the CLI uses for it.

Thread safety: every thread gets its own tritonclient instance (the HTTP client is gevent based and not
safe to share across threads), so the methods can be called from a pool of worker threads.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from biva_core import contract
from biva_core.contract import (BUSY_PREFIX, DEFAULT_ESTIMATOR, DETECTOR_PARAMETER, META_PARAMETER, MODEL_PREFIX,
                                RETRY_AFTER_S, ModelMeta, RequestError, T)
from biva_core.scoring import ScoreRequest
from biva_core.stats import request_of

PROTOCOLS = ("http", "grpc")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
R = TypeVar("R")  # what a retried call returns

# Exit codes of the CLI, one per kind of failure (documented in biva_client/cli.py).
EXIT_ERROR = 1  # the server answered with an error, or anything else unexpected
EXIT_INPUT = 2  # bad command line or input data (click's own usage errors exit 2 too)
EXIT_FLAGGED = 3  # `ood check`: at least one input flagged
EXIT_UNAVAILABLE = 4  # server unreachable, or the model not loaded/ready
EXIT_TIMEOUT = 5  # a request ran past --timeout
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class ClientError(RuntimeError):
    """A failure to show the user as one line; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_ERROR


class InputError(ClientError, ValueError):
    """Inputs that cannot be sent (wrong shape, over a server cap); raised before any request."""

    exit_code = EXIT_INPUT


class ServerUnavailable(ClientError):
    """Nothing answers at the URL, or the connection dropped; retried before it is raised."""

    exit_code = EXIT_UNAVAILABLE


class ModelNotReady(ClientError):
    """The server answers but the model is not loaded (wrong --model-prefix, or still loading)."""

    exit_code = EXIT_UNAVAILABLE


class ServerBusy(ClientError):
    """The model's queue is full, the request waited out its queue timeout, or heavy requests fill their slots
    (HTTP 429): retried after the server's Retry-After until the request's timeout, then raised."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, retry_after: float = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


def _busy(status: str, msg: str) -> bool:
    """HTTP 429; Triton's full queue or queue timeout (UNAVAILABLE over gRPC); the served models' busy answers;
    the gRPC front's RPC limit."""
    return (status == "429" or "Exceeds maximum queue size" in msg or "Request timeout expired" in msg
            or BUSY_PREFIX in msg or "Concurrent RPC limit exceeded" in msg)


def _retry_after(msg: str) -> float:
    """The seconds a busy answer asks the client to wait ("retry after N s" in its message), else RETRY_AFTER_S."""
    m = re.search(r"retry after (\d+(?:\.\d+)?) s", msg)
    return float(m.group(1)) if m else float(RETRY_AFTER_S)


START_HINT = "is the server running? start it with: tritonserver --model-repository triton_models"
REFUSED_TRIES = 3  # a connection refused from the first try: three tries over about 1.75 s, then the hint


class RequestTimeout(ClientError):
    exit_code = EXIT_TIMEOUT


class ServerError(ClientError):
    """The server answered the request with an error (a bad request names the field)."""

    def __init__(self, message: str, status: str = "", transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient


@dataclass
class Scores:
    """Per-image values in nats from biva_score: (B,) each, l_gt_k (B, len(ks)), kl (B, G), by the request's
    estimator (bounds on log p(x) for "sample" and "mean", scores for "mode"; contract.ESTIMATORS)."""

    elbo: np.ndarray  # L_1
    iw_bound: np.ndarray | None  # L_K (equals elbo when iw = 1 with "sample"); None when not asked for
    l_gt_k: np.ndarray  # L^{>k} for each requested k, in the order of `ks`
    kl: np.ndarray  # analytic KL per latent group
    ks: tuple[int, ...]
    seed: int
    estimator: str = DEFAULT_ESTIMATOR
    samples: int = 1


@dataclass
class Encoding:
    """biva_encode's outputs: flat latents (B, D) and KL per group (B, G)."""

    z: np.ndarray
    q_mu: np.ndarray
    q_log_std: np.ndarray
    kl: np.ndarray
    seed: int


def default_url(protocol: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


def check_url(url: str) -> str:
    """host:port (a scheme is dropped: tritonclient wants host:port); InputError unless the port is 1..65535."""
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    host, _, port = url.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"url: expected host:port with a port in 1..65535, got {url!r}")
    return url.rstrip("/")


def check_seed(seed: int, what: str = T.seed) -> int:
    with _as_input_error():
        return contract.check_seed(seed, what)


class _as_input_error:
    """The contract's RequestError (the server would refuse it) as the client's InputError (nothing sent)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> None:
        if kind is not None and issubclass(kind, RequestError):
            raise InputError(str(e)) from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:500] if lines else ""


class BivaClient:
    """A connection to the BIVA front models on one Triton server (HTTP or gRPC)."""

    def __init__(self, url: str | None = None, protocol: str = "http", model_prefix: str = MODEL_PREFIX,
                 timeout: float = 120.0, retries: int = 6, backoff: float = 0.25):
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if timeout <= 0:
            raise InputError(f"timeout: expected seconds > 0, got {timeout}")
        self.protocol = protocol
        self.url = check_url(url or default_url(protocol))
        self.model_prefix = model_prefix
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._meta: ModelMeta | None = None
        self._ready: set[str] = set()
        self._reached = False  # a call has succeeded: a refused connection now is a restart, worth waiting for
        self.requests_sent = 0  # inference requests only, for tests and reports

    # ---- plumbing -------------------------------------------------------------------------------
    def __enter__(self) -> BivaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BivaClient({self.url!r}, protocol={self.protocol!r}, model_prefix={self.model_prefix!r})"

    @property
    def _module(self):
        if self.protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        return module

    def _client(self):
        """This thread's tritonclient instance."""
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "http":
                c = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                       network_timeout=self.timeout)
            else:
                c = self._module.InferenceServerClient(self.url)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        """Close every thread's connection (Triton waits for open HTTP keep-alives on shutdown)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:  # closing a broken connection must not mask the real error
                pass
        self._local = threading.local()

    def model_name(self, role: str) -> str:
        return f"{self.model_prefix}{role}"

    def _where(self) -> str:
        return f"Triton at {self.url} ({self.protocol})"

    def _classify(self, e: BaseException, what: str) -> ClientError:
        """Turn a tritonclient / socket exception into a one-line ClientError."""
        from tritonclient.utils import InferenceServerException

        if isinstance(e, InferenceServerException):
            status = str(e.status() or "")
            msg = _first_line(e.message() or str(e))
            if _busy(status, msg):
                return ServerBusy(f"{what}: the server is busy ({msg}); retry later, or lower --concurrency",
                                  _retry_after(msg))
            if status.endswith("UNAVAILABLE"):
                return ServerUnavailable(f"cannot reach {self._where()}: {msg}")
            if status.endswith("DEADLINE_EXCEEDED"):
                return RequestTimeout(f"{what}: no answer from {self._where()} within {self.timeout:g} s "
                                      "(raise --timeout, or lower --batch-size / --iw)")
            # a 4xx, or a 500 from Triton's request parser, is the request's fault: sending it again cannot help;
            # a stub that died is reloaded by the server's supervisor within seconds
            transient = status in ("502", "503", "504") or (status == "500" and "not healthy" in msg)
            return ServerError(f"{what}: server error: {msg}", status, transient)
        if isinstance(e, (TimeoutError, socket.timeout)) or type(e).__name__ == "Timeout":  # gevent.Timeout
            return RequestTimeout(f"{what}: no answer from {self._where()} within {self.timeout:g} s "
                                  "(raise --timeout, or lower --batch-size / --iw)")
        if type(e).__name__ in ("HTTPParseError", "ParserError") or "parse" in type(e).__name__.lower():
            return ServerUnavailable(f"{self._where()} does not answer in {self.protocol} (is {self.url} the "
                                     f"{'gRPC' if self.protocol == 'http' else 'HTTP'} port?)")
        if type(e).__name__ in ("HTTPConnectionClosed", "ConnectionClosed", "RemoteDisconnected"):
            # geventhttpclient: the server closed the connection mid-request (e.g. it restarted); requests
            # carry their seed, so sending again gives the same answer
            return ServerUnavailable(f"cannot reach {self._where()}: connection closed")
        if isinstance(e, ConnectionRefusedError):
            return ServerUnavailable(f"cannot reach {self._where()}: connection refused; {START_HINT}")
        if isinstance(e, (ConnectionError, socket.gaierror)):
            reason = _first_line(getattr(e, "strerror", None) or str(e)) or type(e).__name__
            return ServerUnavailable(f"cannot reach {self._where()}: {reason}")
        if isinstance(e, OSError):
            return ServerUnavailable(f"cannot reach {self._where()}: {type(e).__name__}: {_first_line(str(e))}")
        return ClientError(f"{what}: {type(e).__name__}: {_first_line(str(e))}")

    def _retry(self, fn: Callable[[Any], R], what: str) -> R:
        """Call fn(tritonclient): transient failures again with exponential backoff (`retries` times), busy answers
        after their Retry-After until `timeout` seconds have passed, a refused connection REFUSED_TRIES times
        unless this client has reached the server before."""
        start, attempt = time.monotonic(), 0
        while True:
            try:
                out = fn(self._client())
                self._reached = True
                return out
            except Exception as e:  # noqa: BLE001 - classified below, re-raised as ClientError
                err = self._classify(e, what)
                err.__cause__ = e
            attempt += 1
            wait = self._wait_before_retry(err, attempt, start)
            if wait is None:
                if attempt > 1:
                    err.args = (f"{err.args[0]} (after {attempt} tries)",)
                raise err
            self._drop_client()  # a reset connection is not reused
            time.sleep(wait)

    def _wait_before_retry(self, err: ClientError, attempt: int, start: float) -> float | None:
        """Seconds to wait before trying again after `err` on try `attempt`, or None to give up."""
        if isinstance(err, ServerBusy):
            left = self.timeout - (time.monotonic() - start)
            return min(err.retry_after, left) if self.retries and left > 0 else None
        refused = isinstance(err, ServerUnavailable) and "connection refused" in str(err) and not self._reached
        limit = min(self.retries, REFUSED_TRIES - 1) if refused else self.retries
        transient = isinstance(err, ServerUnavailable) or getattr(err, "transient", False)
        if not transient or attempt > limit:
            return None
        return self.backoff * 2 ** (attempt - 1)

    def _drop_client(self) -> None:
        c = getattr(self._local, "client", None)
        self._local.client = None
        if c is not None:
            with self._lock:
                if c in self._clients:
                    self._clients.remove(c)
            try:
                c.close()
            except Exception:
                pass

    # ---- health and metadata --------------------------------------------------------------------
    def ensure_ready(self, role: str) -> None:
        """Raise ModelNotReady unless the front model for `role` is loaded and ready (checked once)."""
        name = self.model_name(role)
        if name in self._ready:
            return
        kw = {} if self.protocol == "http" else {"client_timeout": self.timeout}
        if not self._retry(lambda c: c.is_model_ready(name, **kw), f"model {name}"):
            raise ModelNotReady(f"model {name!r} is not ready on {self._where()}; check --model-prefix "
                                "and the server log")
        self._ready.add(name)

    def model_config(self, role: str) -> dict[str, Any]:
        """The model's config as a dict (the same keys over HTTP and gRPC)."""
        name = self.model_name(role)
        self.ensure_ready(role)
        if self.protocol == "http":
            return self._retry(lambda c: c.get_model_config(name), f"model {name}")
        return self._retry(lambda c: c.get_model_config(name, as_json=True, client_timeout=self.timeout),
                           f"model {name}")["config"]

    @property
    def meta(self) -> ModelMeta:
        """biva_meta of the served model (fetched once, from biva_sample's config)."""
        if self._meta is None:
            self._meta = self.fetch_meta("sample")
        return self._meta

    def fetch_meta(self, role: str) -> ModelMeta:
        cfg = self.model_config(role)
        try:
            meta = ModelMeta.from_json(cfg["parameters"][META_PARAMETER]["string_value"])
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError(f"model {self.model_name(role)!r} has no valid {META_PARAMETER} parameter ({e}); "
                              "was it written by biva-export?") from None
        if self._meta is None:
            self._meta = meta
        return meta

    # ---- requests -------------------------------------------------------------------------------
    def _infer(self, role: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One inference request; inputs are sent with the dtype they have."""
        self.ensure_ready(role)
        name, mod = self.model_name(role), self._module

        def call(c):
            tensors = []
            for key, arr in inputs.items():
                t = mod.InferInput(key, list(arr.shape), contract.wire_type(arr))
                t.set_data_from_numpy(np.ascontiguousarray(arr))
                tensors.append(t)
            if self.protocol == "http":
                outs = [mod.InferRequestedOutput(o, binary_data=True) for o in outputs]
                res = c.infer(name, tensors, outputs=outs)
            else:
                outs = [mod.InferRequestedOutput(o) for o in outputs]
                res = c.infer(name, tensors, outputs=outs, client_timeout=self.timeout)
            return {o: res.as_numpy(o) for o in outputs}

        with self._lock:
            self.requests_sent += 1
        return self._retry(call, name)

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) matching the model, 1 <= B <= max_images; InputError otherwise."""
        with _as_input_error():
            contract.check_rows(T.images, images, self.meta.image_shape, self.meta.caps.max_images)
        return np.ascontiguousarray(images, dtype=np.float32)

    def sample(self, n: int, seed: int, temperature: float = 1.0) -> np.ndarray:
        """n images (n, C, H, W) from the prior, at most caps.max_n per request."""
        with _as_input_error():
            contract.check_n(n, self.meta.caps)
            contract.check_temperature(temperature, self.meta.caps)
        out = self._infer("sample", {T.n: np.array([n], np.int64), T.seed: np.array([check_seed(seed)], np.int64),
                                     T.temperature: np.array([temperature], np.float32)}, [T.images])
        return out[T.images]

    def regenerate(self, z: np.ndarray, k: int, seed: int, temperature: float = 1.0) -> np.ndarray:
        """Keep z_{>k} of the flat latents z (B, D), redraw z_{<=k} from the prior (Figure 12)."""
        meta = self.meta
        with _as_input_error():
            z = contract.check_vectors(T.z, z, meta.latent_dim, meta.caps.max_images, meta.caps.max_abs_latent)
            contract.check_k(T.k, k, meta.n_layers)
            contract.check_temperature(temperature, meta.caps)
        out = self._infer("regenerate", {
            T.z: z, T.k: np.array([k], np.int64),
            T.seed: np.array([check_seed(seed)], np.int64), T.temperature: np.array([temperature], np.float32)},
            [T.images])
        return out[T.images]

    def encode(self, images: np.ndarray, seed: int) -> Encoding:
        x = self.check_images(images)
        out = self._infer("encode", {T.images: x, T.seed: np.array([check_seed(seed)], np.int64)},
                          [T.z, T.q_mu, T.q_log_std, T.kl])
        return Encoding(out[T.z], out[T.q_mu], out[T.q_log_std], out[T.kl], int(seed))

    def score(self, images: np.ndarray, seed: int, iw: int = 1, ks: Sequence[int] = (),
              estimator: str = DEFAULT_ESTIMATOR, samples: int = 1, want_iw: bool = True) -> Scores:
        """L_1, L^{>k} for each k and the KL per group by `estimator` (with `samples` draws for "mean"), and
        L_K (K = iw) unless want_iw is False, per image, in nats."""
        x = self.check_images(images)
        req = check_score_request(self.meta, len(x), ScoreRequest(estimator, samples, iw, tuple(ks), want_iw))
        inputs = {T.images: x, T.iw: np.array([iw], np.int64), T.seed: np.array([check_seed(seed)], np.int64),
                  T.estimator: np.array([estimator.encode()], object), T.samples: np.array([samples], np.int64)}
        if req.ks:
            inputs[T.ks] = np.array(req.ks, np.int64)
        outs = [T.elbo, T.l_gt_k, T.kl] + ([T.iw_bound] if want_iw else [])
        out = self._infer("score", inputs, outs)
        l_gt_k = out[T.l_gt_k] if req.ks else np.zeros((len(x), 0), np.float32)
        return Scores(out[T.elbo], out.get(T.iw_bound), l_gt_k, out[T.kl], req.ks, int(seed), estimator, samples)

    def detector(self) -> dict:
        """The served detector's summary (biva_detect's config: stats.Detector.summary)."""
        cfg = self.model_config("detect")
        try:
            return json.loads(cfg["parameters"][DETECTOR_PARAMETER]["string_value"])
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError(f"model {self.model_name('detect')!r} has no valid {DETECTOR_PARAMETER} ({e})") from None

    def detect(self, images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The served detector (biva_detect) on each image: (score (B,), flagged (B,) bool)."""
        x = self.check_images(images)
        check_score_request(self.meta, len(x), request_of(self.detector()))
        out = self._infer("detect", {T.images: x, T.seed: np.array([check_seed(seed)], np.int64)},
                          [T.ood_score, T.ood_flag])
        return out[T.ood_score], out[T.ood_flag].astype(bool)


def check_score_request(meta: ModelMeta, batch: int, req: ScoreRequest) -> ScoreRequest:
    """The server's caps on biva_score, checked here so that nothing is sent that would be refused."""
    with _as_input_error():
        return req.check(batch, meta)
