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
import json
import math
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class BadRequest(ValueError):
    pass


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
        self.role = params["role"]
        self.meta = json.loads(params["biva_meta"])
        self.caps = self.meta["caps"]
        self.graph_rows = int(self.meta["graph_max_batch"])
        self.L = int(self.meta["n_layers"])
        self.D = int(self.meta["latent_dim"])
        self.N = int(self.meta["noise_dim"])
        self.image_shape = tuple(self.meta["image_shape"])

    # ---- request parsing ----------------------------------------------------------------------
    def _get(self, req, name, required=True):
        t = pb_utils.get_input_tensor_by_name(req, name)
        if t is None:
            if required:
                raise BadRequest(f"{name}: missing input")
            return None
        return t.as_numpy()

    def _scalar(self, req, name, default, lo, hi, kind):
        a = self._get(req, name, required=default is None)
        if a is None:
            return default
        if a.size != 1:
            raise BadRequest(f"{name}: expected one value, got shape {tuple(a.shape)}")
        v = a.reshape(-1)[0].item()
        if kind is float and not math.isfinite(v):
            raise BadRequest(f"{name}: expected a finite number, got {v}")
        if not (lo <= v <= hi) or (kind is float and lo == 0 and v <= 0):
            rng = f"> 0 and <= {hi}" if (kind is float and lo == 0) else f"in {lo}..{hi}"
            raise BadRequest(f"{name}: got {v}, expected a value {rng}")
        return kind(v)

    def _seed(self, req):
        s = self._get(req, "seed", required=False)
        if s is None:
            return int.from_bytes(os.urandom(8), "little") >> 1
        if s.size != 1 or int(s.reshape(-1)[0]) < 0:
            raise BadRequest(f"seed: expected one integer >= 0, got {s.reshape(-1)[:4].tolist()}")
        return int(s.reshape(-1)[0])

    def _images(self, req):
        x = self._get(req, "images")
        cap = int(self.caps["max_images"])
        want = "(B, " + ", ".join(map(str, self.image_shape)) + f") with 1 <= B <= {cap}"
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape or not 1 <= x.shape[0] <= cap:
            raise BadRequest(f"images: expected shape {want}, got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise BadRequest("images: contains NaN or Inf; expected pixel values in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise BadRequest(f"images: values in [{lo:g}, {hi:g}], expected pixel values in [0, 1]")
        if self.meta["likelihood"] == "bernoulli" and not np.all((x == 0.0) | (x == 1.0)):
            raise BadRequest("images: this model is binary; expected pixel values in {0, 1} "
                             f"(binarise with '{self.meta['binarize']}' as the checkpoint's test set was)")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _latents(self, req):
        z = self._get(req, "z")
        cap = int(self.caps["max_images"])
        if z.ndim != 2 or z.shape[1] != self.D or not 1 <= z.shape[0] <= cap:
            raise BadRequest(f"z: expected shape (B, {self.D}) with 1 <= B <= {cap}, got {tuple(z.shape)}")
        if not np.isfinite(z).all():
            raise BadRequest("z: contains NaN or Inf; expected finite latents")
        return np.ascontiguousarray(z, dtype=np.float32)

    # ---- graph calls --------------------------------------------------------------------------
    def _call(self, graph, inputs, outputs):
        """BLS call in slices of at most graph_rows rows; outputs concatenated."""
        rows = next(iter(inputs.values())).shape[0]
        parts = [[] for _ in outputs]
        for s in range(0, rows, self.graph_rows):
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(a[s:s + self.graph_rows])) for n, a in inputs.items()]
            req = pb_utils.InferenceRequest(model_name=self.meta["graphs"][graph], requested_output_names=outputs,
                                            inputs=tensors)
            resp = req.exec()
            if resp.has_error():
                raise RuntimeError(f"{self.meta['graphs'][graph]}: {resp.error().message()}")
            for i, o in enumerate(outputs):
                parts[i].append(pb_utils.get_output_tensor_by_name(resp, o).as_numpy())
        return [np.concatenate(p, axis=0) if len(p) > 1 else p[0] for p in parts]

    def _sample(self, z, k, temperature, noise):
        B = z.shape[0]
        images, _ = self._call("sampler", {
            "z": z, "k": np.full((B, 1), k, np.int64), "temperature": np.full((B, 1), temperature, np.float32),
            "noise": noise}, ["images", "z_out"])
        return images

    # ---- roles --------------------------------------------------------------------------------
    def _role_sample(self, req, seed, rng):
        n = self._scalar(req, "n", None, 1, int(self.caps["max_n"]), int)
        t = self._scalar(req, "temperature", 1.0, 0, float(self.caps["max_temperature"]), float)
        noise = rng.standard_normal((n, self.D), dtype=np.float32)
        images = self._sample(np.zeros((n, self.D), np.float32), self.L, t, noise)
        return {"images": images}

    def _role_regenerate(self, req, seed, rng):
        z = self._latents(req)
        k = self._scalar(req, "k", None, 0, self.L, int)
        t = self._scalar(req, "temperature", 1.0, 0, float(self.caps["max_temperature"]), float)
        noise = rng.standard_normal((z.shape[0], self.D), dtype=np.float32)
        return {"images": self._sample(z, k, t, noise)}

    def _role_encode(self, req, seed, rng):
        x = self._images(req)
        noise = rng.standard_normal((x.shape[0], self.N), dtype=np.float32)
        z, mu, log_std, kl = self._call("encoder", {"images": x, "noise": noise}, ["z", "q_mu", "q_log_std", "kl"])
        return {"z": z, "q_mu": mu, "q_log_std": log_std, "kl": kl}

    def _ks(self, req):
        ks = self._get(req, "ks", required=False)
        if ks is None:
            return np.zeros(1, np.int64)
        ks = ks.reshape(-1).astype(np.int64)
        if not 1 <= ks.size <= self.L + 1 or ks.min() < 0 or ks.max() > self.L:
            raise BadRequest(f"ks: got {ks.tolist()[:8]}, expected 1 to {self.L + 1} values, each in 0..{self.L}")
        return ks

    def _role_score(self, req, seed, rng):
        x = self._images(req)
        B = x.shape[0]
        K = self._scalar(req, "iw", 1, 1, int(self.caps["max_iw"]), int)
        if K * B > int(self.caps["max_iw_rows"]):
            raise BadRequest(f"iw: iw x batch = {K} x {B} = {K * B} exceeds the cap of {self.caps['max_iw_rows']} "
                             "rows per request; send fewer images per request")
        ks = self._ks(req)
        chunk = max(1, self.graph_rows // B)
        lse = np.full(B, -np.inf)
        done = 0
        while done < K:
            c = min(chunk, K - done)
            eps = rng.standard_normal((c, B, self.N), dtype=np.float32).reshape(c * B, self.N)
            parts = []
            if done == 0:  # sample 0: L_1, KL and L^{>k} for every k, as biva_core.objectives does
                nk = ks.size
                log_w, log_w_gt_k, kl = self._call("scorer", {
                    "images": np.tile(x, (nk, 1, 1, 1)), "noise": np.tile(eps[:B], (nk, 1)),
                    "k": np.repeat(ks, B).reshape(-1, 1)}, ["log_w", "log_w_gt_k", "kl"])
                elbo, kl = log_w[:B, 0], kl[:B]
                l_gt_k = log_w_gt_k[:, 0].reshape(nk, B).T  # (B, nk)
                parts.append(elbo[None].astype(np.float64))
                eps, c_rest = eps[B:], c - 1
            else:
                c_rest = c
            if c_rest:  # samples 1..K-1 need only log w: the encoder's single top-down pass gives it
                lw, = self._call("encoder", {"images": np.tile(x, (c_rest, 1, 1, 1)), "noise": eps}, ["log_w"])
                parts.append(lw[:, 0].reshape(c_rest, B).astype(np.float64))
            block = np.concatenate(parts, axis=0)
            m = block.max(axis=0)
            lse = np.logaddexp(lse, m + np.log(np.exp(block - m).sum(axis=0)))
            done += c
        iw_bound = (lse - math.log(K)).astype(np.float32)
        return {"elbo": elbo.astype(np.float32), "iw_bound": iw_bound, "l_gt_k": l_gt_k.astype(np.float32),
                "kl": kl}

    def execute(self, requests):
        handler = getattr(self, f"_role_{self.role}")
        responses = []
        for req in requests:
            try:
                seed = self._seed(req)
                outs = handler(req, seed, np.random.default_rng(seed))
            except BadRequest as e:
                responses.append(_error(str(e)))
                continue
            except Exception as e:  # a graph failed: report it, keep serving
                responses.append(_error(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", invalid=False))
                continue
            outs["seed"] = np.array([seed], np.int64)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outs.items()]))
        return responses
