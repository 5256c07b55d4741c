"""Triton python-backend front model: the request API in front of the three graph models.

Copied into the model repository by biva-export; depends only on numpy and Triton's
triton_python_backend_utils, so it runs in NVIDIA's container beside the native onnxruntime backend.
One file serves four roles (config parameter "role"):

    biva_sample      n, [seed], [temperature]            -> images, seed
    biva_regenerate  z, k, [seed], [temperature]         -> images, seed      (Figure 12)
    biva_encode      images, [seed]                      -> z, q_mu, q_log_std, kl, seed
    biva_score       images, [iw], [ks], [seed]          -> elbo, iw_bound, l_gt_k, kl, seed

Noise never travels over the network: it is drawn here from the request's seed with numpy's
default_rng (PCG64), in the same order as biva_core.noise.NoiseStream, so PyTorch reproduces it. A
request without a seed gets a fresh one, returned in the response. The graphs are called through BLS,
in slices of at most the graph's max batch size, so memory stays bounded whatever K is.
Every bad request gets INVALID_ARG naming the field, the value and what was expected.
"""
import asyncio
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

# export/contract.py, copied beside this file by biva-export: names, caps, metadata, checks, L_K estimator
from biva_contract import (ENCODER, GRAPH_INSTANCES_PARAMETER, IW_CALL_ROWS, META_PARAMETER, ROLE_PARAMETER, SAMPLER,
                           SCORER, LogMeanExp, ModelMeta, T, RequestError, check_images, check_iw, check_iw_rows,
                           check_k, check_ks, check_n, check_temperature, check_vectors, iw_calls, iw_chunks)


def _error(msg, invalid=True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    try:
        err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    except TypeError:  # older python backends take no code
        err = pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(error=err)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.role = params[ROLE_PARAMETER]
        self.meta = ModelMeta.from_json(params[META_PARAMETER])
        self.caps = self.meta.caps
        self.graph_rows = self.meta.graph_max_batch
        self.L, self.D, self.N = self.meta.n_layers, self.meta.latent_dim, self.meta.noise_dim
        # a request's graph calls go to every instance of the graph model at once: its rows split in as many
        # slices, one call per instance in flight. A second call queued behind a busy instance is merged by the
        # dynamic batcher into the next free instance's batch with the first waiting one, so both land on one
        # instance and the other idles (IW K = 1000 over gRPC, biva-bench: 1.39 s per image with two per instance
        # and a 500 us batcher delay, 1.33 s with one and no delay; README, Speed)
        self.instances = max(1, int(params.get(GRAPH_INSTANCES_PARAMETER, "1")))
        self.inflight = self.instances

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
        return a.reshape(-1)[0].item()

    def _temperature(self, req):
        t = self._one(req, T.temperature, 1.0)
        check_temperature(t, self.caps)
        return float(t)

    def _seed(self, req):
        s = self._get(req, T.seed, required=False)
        if s is None:
            return int.from_bytes(os.urandom(8), "little") >> 1
        if s.size != 1 or int(s.reshape(-1)[0]) < 0:
            raise RequestError(f"seed: expected one integer >= 0, got {s.reshape(-1)[:4].tolist()}")
        return int(s.reshape(-1)[0])

    def _images(self, req):
        return check_images(self._get(req, T.images), self.meta, self.caps.max_images)

    def _latents(self, req):
        return check_vectors(T.z, self._get(req, T.z), self.D, self.caps.max_images, self.caps.max_abs_latent)

    # ---- graph calls --------------------------------------------------------------------------
    def _call(self, graph, inputs, outputs):
        """BLS calls in one slice per graph instance, of at most graph_rows rows each; outputs concatenated."""
        rows = next(iter(inputs.values())).shape[0]
        step = max(1, min(self.graph_rows, -(-rows // self.instances)))
        sliced = [({n: a[s:s + step] for n, a in inputs.items()}, outputs) for s in range(0, rows, step)]
        parts = list(zip(*self._exec_all(graph, sliced)))  # per output, its slices
        return [np.concatenate(p, axis=0) if len(p) > 1 else p[0] for p in parts]

    def _exec_all(self, graph, calls):
        """The BLS calls [(inputs, output names)] to `graph`, up to self.inflight of them in flight (one per graph
        model instance); each call's outputs, in order."""
        reqs = [pb_utils.InferenceRequest(model_name=graph, requested_output_names=outs, inputs=[
            pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in inputs.items()]) for inputs, outs in calls]
        if len(reqs) == 1:
            resps = [r.exec() for r in reqs]
        else:
            resps = asyncio.run(self._gather(reqs))
        out = []
        for resp, (_, outs) in zip(resps, calls):
            if resp.has_error():
                raise RuntimeError(f"{graph}: {resp.error().message()}")
            out.append([pb_utils.get_output_tensor_by_name(resp, o).as_numpy() for o in outs])
        return out

    async def _gather(self, reqs):
        gate = asyncio.Semaphore(self.inflight)

        async def one(r):
            async with gate:
                return await r.async_exec()
        return await asyncio.gather(*(one(r) for r in reqs))

    def _sample(self, z, k, temperature, noise):
        B = z.shape[0]
        images, _ = self._call(SAMPLER, {
            T.z: z, T.k: np.full((B, 1), k, np.int64), T.temperature: np.full((B, 1), temperature, np.float32),
            T.noise: noise}, [T.images, T.z_out])
        return images

    # ---- roles --------------------------------------------------------------------------------
    def _role_sample(self, req, seed, rng):
        n = check_n(self._one(req, T.n, None), self.caps)
        t = self._temperature(req)
        noise = rng.standard_normal((n, self.D), dtype=np.float32)
        images = self._sample(np.zeros((n, self.D), np.float32), self.L, t, noise)
        return {T.images: images}

    def _role_regenerate(self, req, seed, rng):
        z = self._latents(req)
        k = self._one(req, T.k, None)
        check_k(T.k, k, self.L)
        t = self._temperature(req)
        noise = rng.standard_normal((z.shape[0], self.D), dtype=np.float32)
        return {T.images: self._sample(z, k, t, noise)}

    def _role_encode(self, req, seed, rng):
        x = self._images(req)
        noise = rng.standard_normal((x.shape[0], self.N), dtype=np.float32)
        z, mu, log_std, kl = self._call(ENCODER, {T.images: x, T.noise: noise}, [T.z, T.q_mu, T.q_log_std, T.kl])
        return {T.z: z, T.q_mu: mu, T.q_log_std: log_std, T.kl: kl}

    def _ks(self, req):
        ks = self._get(req, T.ks, required=False)
        return np.zeros(1, np.int64) if ks is None else check_ks(ks, self.L)

    def _role_score(self, req, seed, rng):
        x = self._images(req)
        B = x.shape[0]
        K = check_iw(self._one(req, T.iw, 1), self.caps)
        check_iw_rows(K, B, self.caps)
        ks = self._ks(req)
        lme, elbo, sample0 = LogMeanExp(B), None, None
        for c in iw_chunks(K, B, self.graph_rows):
            eps = rng.standard_normal((c, B, self.N), dtype=np.float32)  # (c, B, N): NoiseStream's order
            log_w, first = self._iw_block(x, eps, ks if elbo is None else None)
            if elbo is None:  # sample 0: L_1, with L^{>k} for every k and the KL from the same calls
                elbo, sample0 = log_w[0], first
            lme.add(log_w)
        l_gt_k, kl = sample0
        return {T.elbo: elbo.astype(np.float32), T.iw_bound: lme.value().astype(np.float32), T.l_gt_k: l_gt_k,
                T.kl: kl}

    def _iw_block(self, x, eps, ks):
        """log w (c, B) of the samples eps (c, B, N) of images x, on the scorer in the calls contract.iw_calls
        plans: a few images with several samples each, so the stages that see x alone run once per image and
        call. With `ks` the block starts at sample 0, whose calls also take every k (J = len(ks): L^{>k} of
        sample 0, as biva_core.objectives) and give its KL: then also (l_gt_k (B, J), kl (B, G)), else None."""
        noise = eps.transpose(1, 0, 2)  # (B, c, N): an image's samples along the scorer's sample axis
        log_w = np.empty(eps.shape[:2], np.float32)
        B, G = eps.shape[1], len(self.meta.groups)
        sample0 = (np.empty((B, ks.size), np.float32), np.empty((B, G), np.float32)) if ks is not None else None
        plan, calls = iw_calls(eps.shape[0], B, min(IW_CALL_ROWS, self.graph_rows)), []
        for imgs, smp in plan:
            n, with_ks = imgs.stop - imgs.start, sample0 is not None and smp.start == 0
            k = np.tile(ks, (n, 1)) if with_ks else np.zeros((n, 0), np.int64)  # (n, J); J = 0: no L^{>k} pass
            calls.append(({T.images: x[imgs], T.noise: noise[imgs, smp], T.k: k},
                          [T.log_w, T.log_w_gt_k, T.kl] if with_ks else [T.log_w]))
        for (imgs, smp), outs in zip(plan, self._exec_all(SCORER, calls)):
            log_w[smp, imgs] = outs[0].T  # (samples, images)
            if len(outs) > 1:  # the calls holding sample 0, with every k
                sample0[0][imgs], sample0[1][imgs] = outs[1], outs[2]
        return log_w, sample0

    def execute(self, requests):
        handler = getattr(self, f"_role_{self.role}")
        responses = []
        for req in requests:
            try:
                seed = self._seed(req)
                outs = handler(req, seed, np.random.default_rng(seed))
            except RequestError as e:
                responses.append(_error(str(e)))
                continue
            except Exception as e:  # a graph failed: report it, keep serving
                responses.append(_error(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", invalid=False))
                continue
            outs[T.seed] = np.array([seed], np.int64)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outs.items()]))
        return responses
