"""Triton python-backend front model: the request API in front of the three graph models.

biva-export writes this file into the model repository with the biva_core modules it imports beside it (contract,
scoring, inflight, stats: export/repository.py's SERVED_CORE); it depends only on numpy and Triton's
triton_python_backend_utils, so it runs in NVIDIA's container beside the native onnxruntime backend. One file
serves five roles (config parameter contract.ROLE_PARAMETER):

    biva_sample      n, [seed], [temperature]                          -> images, seed
    biva_regenerate  z, k, [seed], [temperature]                       -> images, seed      (Figure 12)
    biva_encode      images, [seed]                                    -> z, q_mu, q_log_std, kl, seed
    biva_score       images, [iw], [ks], [estimator], [samples], [seed] -> elbo, iw_bound, l_gt_k, kl, seed
    biva_detect      images, [seed]                                    -> ood_score, ood_flag, seed

Noise never travels over the network: it is drawn here from the request's seed (contract.noise_rng), in the
order biva_core.noise.NoiseStream draws it, so PyTorch reproduces every number. A request without a seed gets
a fresh one, returned in the response. The graphs are called through BLS, in slices of at most the graph's max
batch size, so memory stays bounded whatever K is. Every bad request gets INVALID_ARG naming the field.

Scoring requests (biva_score, biva_detect) run scoring.run_score's plan and stop between scorer calls when their
client has gone: Triton marks a request whose gRPC client cancelled or passed its deadline (request.is_cancelled),
and the launcher's fronts name each request with a token they mark in the cancel folder when its client hangs
up, its deadline passes or the server shuts down (inflight.CANCEL_DIR_ENV). A request costing more than
scoring.HEAVY_ROWS runs only while fewer than scoring.heavy_slots() others do, so an instance of the model and of
the scorer is always left to small requests: the others are answered "busy" (UNAVAILABLE; HTTP 429 with
Retry-After through the front).
"""
import asyncio
import fcntl
import json
import os
import sys
import tempfile

import numpy as np
import triton_python_backend_utils as pb_utils

# the biva_core copied beside this file comes first: a repository serves the code it was exported with, whatever
# biva_core the server's Python has installed (an image rolled out before the repository was exported again)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from biva_core.contract import (BUSY_PREFIX, DETECTOR_FILE, ENCODER, GRAPH_INSTANCES_PARAMETER, META_PARAMETER,
                                ROLE_PARAMETER, SAMPLER, SCORER, Busy, Cancelled, ModelMeta, RequestError, T,
                                check_images, check_k, check_ks, check_n, check_seed, check_temperature, check_vectors,
                                draw_noise, noise_rng)
from biva_core.inflight import CANCEL_DIR_ENV, SHUTDOWN_MARK, TOKEN_PARAMETER, InFlight
from biva_core.scoring import CALL_ROWS, HEAVY_ROWS, ScoreRequest, heavy_slots, run_score
from biva_core.stats import Detector


def _error(e: Exception):
    """The response for a refused or failed request: INVALID_ARG for the request's fault, UNAVAILABLE for busy,
    CANCELLED for a request whose client has gone, INTERNAL otherwise."""
    E = pb_utils.TritonError
    if isinstance(e, RequestError):
        code, msg = E.INVALID_ARG, str(e)
    elif isinstance(e, Busy):
        code, msg = E.UNAVAILABLE, f"{BUSY_PREFIX} {e}"
    elif isinstance(e, Cancelled):
        code, msg = E.CANCELLED, str(e)
    else:  # a graph failed: report it, keep serving
        code, msg = E.INTERNAL, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return pb_utils.InferenceResponse(error=E(msg, code))


class _Gate:
    """Is a request still wanted? Its client may have cancelled (Triton), hung up (the front's token) or the
    server may be shutting down (the launcher's mark). Raises Cancelled when not."""

    def __init__(self, req, cancel_dir: str | None):
        self.req, self.marks = req, []
        self.shutdown = os.path.join(cancel_dir, SHUTDOWN_MARK) if cancel_dir else None
        if cancel_dir:
            try:
                token = json.loads(req.parameters() or "{}").get(TOKEN_PARAMETER)
            except (ValueError, AttributeError):
                token = None
            if isinstance(token, str) and token.isalnum():
                self.marks.append(os.path.join(cancel_dir, token))

    def __call__(self) -> None:
        if self.req.is_cancelled():
            raise Cancelled("the request was cancelled by its client")
        if self.marks and os.path.exists(self.marks[0]):
            raise Cancelled("the request was abandoned by its client")
        if self.shutdown and os.path.exists(self.shutdown):  # busy: the client tries again once the server is back
            raise Busy("the server is shutting down")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.role = params[ROLE_PARAMETER]
        self.name = config["name"]
        self.meta = ModelMeta.from_json(params[META_PARAMETER])
        self.caps = self.meta.caps
        self.graph_rows = self.meta.graph_max_batch
        self.L, self.D, self.N = self.meta.n_layers, self.meta.latent_dim, self.meta.noise_dim
        # a request's graph calls go to every instance of the graph model at once: its rows split in as many
        # slices, one call per instance in flight. A second call queued behind a busy instance is merged by the
        # dynamic batcher into the next free instance's batch with the first waiting one, so both land on one
        # instance and the other idles (docs/speed.md: the served IW path); calls sent at once are kept apart by the
        # graph models' preferred batch size (a full slice: biva_export.serving_config.ServingConfig.preferred)
        self.instances = max(1, int(params.get(GRAPH_INSTANCES_PARAMETER, "1")))
        self.cancel_dir = os.environ.get(CANCEL_DIR_ENV) or None
        self.in_flight = InFlight(self.cancel_dir)  # the supervisor sees this stub at work (its graph calls included)
        count = sum(g.get("count", 1) for g in config.get("instance_group", [])) or 1
        self.heavy_slots = heavy_slots(count, self.instances)
        self.detector = None
        if self.role == "detect":
            here = os.path.join(args["model_repository"], args["model_version"])
            with open(os.path.join(here, DETECTOR_FILE)) as f:
                self.detector = Detector.from_json(f.read())

    # ---- request parsing ----------------------------------------------------------------------
    def _get(self, req, name, required=True):
        t = pb_utils.get_input_tensor_by_name(req, name)
        if t is None:
            if required:
                raise RequestError(f"{name}: missing input")
            return None
        return t.as_numpy()

    def _one(self, req, name, default):
        """The single value of a (1,) input, or `default` when it is optional and absent."""
        a = self._get(req, name, required=default is None)
        if a is None:
            return default
        if a.size != 1:
            raise RequestError(f"{name}: expected one value, got shape {tuple(a.shape)}")
        v = a.reshape(-1)[0]
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item()

    def _temperature(self, req):
        t = self._one(req, T.temperature, 1.0)
        check_temperature(t, self.caps)
        return float(t)

    def _seed(self, req):
        s = self._get(req, T.seed, required=False)
        if s is None:
            return int.from_bytes(os.urandom(8), "little") >> 1
        if s.size != 1:
            raise RequestError(f"seed: expected one integer in 0..2^63-1, got shape {tuple(s.shape)}")
        return check_seed(int(s.reshape(-1)[0]))

    def _images(self, req):
        return check_images(self._get(req, T.images), self.meta, self.caps.max_images)

    def _latents(self, req):
        return check_vectors(T.z, self._get(req, T.z), self.D, self.caps.max_images, self.caps.max_abs_latent)

    # ---- graph calls --------------------------------------------------------------------------
    def _call(self, graph, inputs, outputs):
        """BLS calls of at most CALL_ROWS rows each, spread over the graph model's instances; outputs concatenated."""
        rows = next(iter(inputs.values())).shape[0]
        step = max(1, min(self.graph_rows, CALL_ROWS, -(-rows // self.instances)))
        sliced = [{n: a[s:s + step] for n, a in inputs.items()} for s in range(0, rows, step)]
        parts = list(zip(*self._exec_all(graph, sliced, outputs)))  # per output, its slices
        return [np.concatenate(p, axis=0) if len(p) > 1 else p[0] for p in parts]

    def _exec_all(self, graph, feeds, outputs, check=lambda: None):
        """The BLS calls (one per feeds dict) to `graph`, up to one per graph model instance in flight; each call's
        outputs, in order. `check()` runs before each call starts (it raises to stop the request)."""
        reqs = [pb_utils.InferenceRequest(model_name=graph, requested_output_names=outputs, inputs=[
            pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in f.items()]) for f in feeds]
        if len(reqs) == 1:
            check()
            resps = [reqs[0].exec()]
        else:
            resps = asyncio.run(self._gather(reqs, check))
        out = []
        for resp in resps:
            if resp.has_error():
                raise RuntimeError(f"{graph}: {resp.error().message()}")
            out.append([pb_utils.get_output_tensor_by_name(resp, o).as_numpy() for o in outputs])
        return out

    async def _gather(self, reqs, check):
        gate = asyncio.Semaphore(self.instances)

        async def one(r):
            async with gate:
                check()
                return await r.async_exec()
        tasks = [asyncio.ensure_future(one(r)) for r in reqs]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:  # let the calls in flight finish before the error reaches the caller
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _sample(self, z, k, temperature, noise):
        B = z.shape[0]
        images, _ = self._call(SAMPLER, {
            T.z: z, T.k: np.full((B, 1), k, np.int64), T.temperature: np.full((B, 1), temperature, np.float32),
            T.noise: noise}, [T.images, T.z_out])
        return images

    def _score(self, req, x, score_req, rng):
        """scoring.run_score on the scorer graph, heavy requests within their slots, stopped once abandoned."""
        gate = _Gate(req, self.cancel_dir)
        outputs = {True: [T.log_w, T.log_w_gt_k, T.kl], False: [T.log_w]}
        run = lambda: run_score(score_req, x, rng, self.N, self.graph_rows, len(self.meta.groups),  # noqa: E731
                                lambda feeds, ks: self._exec_all(SCORER, feeds, outputs[ks], gate), gate)
        if score_req.rows(len(x)) <= HEAVY_ROWS:
            return run()
        with _heavy_slot(self.cancel_dir, self.name, self.heavy_slots, score_req.rows(len(x))):
            return run()

    # ---- roles --------------------------------------------------------------------------------
    def _role_sample(self, req, rng):
        n = check_n(self._one(req, T.n, None), self.caps)
        t = self._temperature(req)
        images = self._sample(np.zeros((n, self.D), np.float32), self.L, t, draw_noise(rng, (n, self.D)))
        return {T.images: images}

    def _role_regenerate(self, req, rng):
        z = self._latents(req)
        k = self._one(req, T.k, None)
        check_k(T.k, k, self.L)
        t = self._temperature(req)
        return {T.images: self._sample(z, k, t, draw_noise(rng, (z.shape[0], self.D)))}

    def _role_encode(self, req, rng):
        x = self._images(req)
        noise = draw_noise(rng, (x.shape[0], self.N))
        z, mu, log_std, kl = self._call(ENCODER, {T.images: x, T.noise: noise}, [T.z, T.q_mu, T.q_log_std, T.kl])
        return {T.z: z, T.q_mu: mu, T.q_log_std: log_std, T.kl: kl}

    def _role_score(self, req, rng):
        x = self._images(req)
        ks = self._get(req, T.ks, required=False)
        asked = set(req.requested_output_names() or ())
        score_req = ScoreRequest(str(self._one(req, T.estimator, self.meta.estimator)),
                                 self._one(req, T.samples, 1), self._one(req, T.iw, 1),
                                 () if ks is None else tuple(int(k) for k in check_ks(ks, self.L)),
                                 want_iw=not asked or T.iw_bound in asked).check(len(x), self.meta)
        return self._score(req, x, score_req, rng)

    def _role_detect(self, req, rng):
        x = self._images(req)
        d = self.detector
        score_req = d.request().check(len(x), self.meta)
        out = self._score(req, x, score_req, rng)
        scores = d.scores(out[T.elbo], out[T.kl], out[T.l_gt_k], out.get(T.iw_bound))
        return {T.ood_score: scores.astype(np.float32), T.ood_flag: scores > d.threshold}

    def execute(self, requests):
        with self.in_flight:
            return self._execute(requests)

    def _execute(self, requests):
        handler = getattr(self, f"_role_{self.role}")
        responses = []
        for req in requests:
            try:
                seed = self._seed(req)
                outs = handler(req, noise_rng(seed))
            except Exception as e:  # noqa: BLE001 - every failure is answered, the model keeps serving
                responses.append(_error(e))
                continue
            outs[T.seed] = np.array([seed], np.int64)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outs.items()]))
        return responses


class _heavy_slot:
    """One of `slots` cross-instance slots for heavy requests of model `name` (an flock on a file in the cancel
    folder, released when the instance finishes or dies); Busy when every slot is taken."""

    def __init__(self, folder, name, slots, rows):
        self.name, self.slots, self.rows, self.f = name, slots, rows, None
        self.folder = folder or os.path.join(tempfile.gettempdir(), f"biva-heavy-{os.getppid()}")  # ppid: Triton

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        for i in range(self.slots):
            f = open(os.path.join(self.folder, f"heavy-{self.name}-{i}.lock"), "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self.f = f
            return self
        raise Busy(f"{self.slots} request(s) costing over {HEAVY_ROWS} scorer rows are already running (this one "
                   f"costs {self.rows}); retry later, or send fewer images or draws per request")

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
