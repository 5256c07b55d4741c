"""Triton python-backend model serving one exported graph: the ONNX graph in ONNX Runtime, or (config
parameter runtime "aoti", on an instance of AOTI_MIN_THREADS package threads or more) from AOTI_MIN_ROWS rows the
AOTInductor package compiled from the same graph, with torch, in slices of AOTI_SLICE_ROWS (full slices on the
package compiled for that batch, where exported). A repository exported without packages (biva-export compiles
them only for instances of AOTI_MIN_THREADS threads or more) and served on more threads per instance says so in
one line at load and serves ONNX Runtime.

biva-export writes this file into the model repository with the biva_core modules it imports beside it (contract,
routing, runtimes, inflight: export/repository.py's SERVED_CORE); it depends only on numpy, onnxruntime (and torch
for "aoti") and Triton's triton_python_backend_utils. The
dynamic batcher hands over a list of requests: each is checked as the API models check theirs (finite values
in range, binary pixels for a binary model, k in 0..L, 0 < temperature <= cap), the good ones are stacked,
run once, and the outputs split back by row counts; a row whose output is not finite is answered with an
error, never a 200. Input and output names come from the model's config.pbtxt (generated from the graph's spec).
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# the biva_core copied beside this file comes first: a repository serves the code it was exported with, whatever
# biva_core the server's Python has installed (an image rolled out before the repository was exported again)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from biva_core.contract import META_PARAMETER, ModelMeta, RequestError, check_graph_inputs
from biva_core.inflight import CANCEL_DIR_ENV, InFlight
from biva_core.routing import (AOTI_MIN_ROWS, AOTI_MIN_THREADS, AOTI_THREADS_PARAMETER, ARENA_KEEP_ROWS,
                               ONNX_FILE_PARAMETER, PACKAGE_FILE, PACKAGE_ISA_PARAMETER, RUNTIME_PARAMETER,
                               SLICE_PACKAGE_FILE, SPINNING_PARAMETER, THREADS_PARAMETER, call_rows, run_in_slices,
                               served_runtime)
from biva_core.runtimes import OrtOptions, aoti_runner, check_package_isa, ort_session, ort_shrinking_run


def _param(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _warn(msg):
    """One line into Triton's log (the python backend's Logger), or onto stderr where there is none."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_warn(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def _error(msg, invalid):
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, code))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.dtypes = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["input"]}
        self.meta = ModelMeta.from_json(_param(config, META_PARAMETER, "null"))
        self.in_flight = InFlight(os.environ.get(CANCEL_DIR_ENV) or None)  # the supervisor sees this stub at work
        here = os.path.join(args["model_repository"], args["model_version"])
        gpu = args.get("model_instance_kind") == "GPU"
        spinning = _param(config, SPINNING_PARAMETER, "")  # "1" / "0"; absent: ONNX Runtime's default
        threads = int(_param(config, THREADS_PARAMETER, "0"))
        if threads == 0 and not gpu:  # the cores shared out between this model's instances (each is a process)
            count = sum(g.get("count", 1) for g in config.get("instance_group", [])) or 1
            threads = max(1, len(os.sched_getaffinity(0)) // count)
        self.runtime = _param(config, RUNTIME_PARAMETER, "onnxruntime")
        options = OrtOptions(threads=threads, gpu_device=int(args["model_instance_device_id"]) if gpu else None,
                             spinning=None if spinning == "" else spinning == "1")
        session = ort_session(os.path.join(here, _param(config, ONNX_FILE_PARAMETER, "model.onnx")), options)
        shrink = ort_shrinking_run()  # a large call's arena memory goes back to the system after it
        self.ort = lambda feeds: session.run(self.outputs, feeds, shrink if call_rows(feeds) > ARENA_KEEP_ROWS else None)
        self.run = self.ort
        aoti_threads = int(_param(config, AOTI_THREADS_PARAMETER, "0")) or threads
        packaged = os.path.isfile(os.path.join(here, PACKAGE_FILE))
        if self.runtime == "aoti" and packaged:
            check_package_isa(self.name, json.loads(_param(config, PACKAGE_ISA_PARAMETER, "{}")))
        elif self.runtime == "aoti":  # biva-export compiled no package: ONNX Runtime at every size
            # exported for instances of fewer threads, served on more: say so once per model (its first instance)
            if served_runtime(self.runtime, AOTI_MIN_ROWS, aoti_threads) == "aoti" and \
                    args.get("model_instance_name", "_0").endswith("_0"):
                _warn(f"{self.name}: instances of {aoti_threads} threads would run the AOTInductor package from "
                      f"{AOTI_MIN_ROWS} rows, but the repository has none (exported for instances of fewer than "
                      f"{AOTI_MIN_THREADS} threads); serving ONNX Runtime at every size (export with biva-export "
                      f"--target-threads {aoti_threads} for the packages)")
            self.runtime = "onnxruntime"
        if served_runtime(self.runtime, AOTI_MIN_ROWS, aoti_threads) == "aoti":
            # the AOTInductor package of the same graph (export/aoti.py) from AOTI_MIN_ROWS rows; an instance of fewer
            # than AOTI_MIN_THREADS package threads runs ONNX Runtime alone and loads no package
            package = aoti_runner(os.path.join(here, PACKAGE_FILE), aoti_threads)
            on_package = lambda f: package(*(f[n] for n in self.inputs))  # noqa: E731
            on_slice = None  # full slices on the package compiled for exactly that many images, when exported
            if os.path.isfile(os.path.join(here, SLICE_PACKAGE_FILE)):
                sliced = aoti_runner(os.path.join(here, SLICE_PACKAGE_FILE), aoti_threads)
                on_slice = lambda f: sliced(*(f[n] for n in self.inputs))  # noqa: E731
            self.run = lambda feeds: run_in_slices(on_package, feeds, full=on_slice) \
                if served_runtime(self.runtime, call_rows(feeds), aoti_threads) == "aoti" else self.ort(feeds)

    def _feeds(self, req):
        feeds = {n: pb_utils.get_input_tensor_by_name(req, n).as_numpy().astype(self.dtypes[n], copy=False)
                 for n in self.inputs}
        check_graph_inputs(self.name, feeds, self.meta)
        return feeds

    def execute(self, requests):
        with self.in_flight:
            return self._execute(requests)

    def _execute(self, requests):
        responses = [None] * len(requests)
        good, feeds = [], {name: [] for name in self.inputs}
        for i, req in enumerate(requests):
            try:
                f = self._feeds(req)
            except RequestError as e:
                responses[i] = _error(str(e), invalid=True)
                continue
            good.append((i, next(iter(f.values())).shape[0]))
            for name in self.inputs:
                feeds[name].append(f[name])
        if not good:
            return responses
        stacked = {n: np.ascontiguousarray(np.concatenate(v, axis=0)) for n, v in feeds.items()}
        try:
            results = self.run(stacked)
        except Exception as e:  # answer every request of the batch with the error
            for i, _ in good:
                responses[i] = _error(f"{self.runtime} failed: {str(e).splitlines()[0][:300]}", invalid=False)
            return responses
        start = 0
        for i, n in good:
            outs = [r[start:start + n] for r in results]
            if all(np.isfinite(o).all() for o in outs):
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, o) for name, o in zip(self.outputs, outs)])
            else:
                responses[i] = _error(f"{self.name}: the inputs give a non-finite output (NaN or Inf); "
                                      "check their range", invalid=True)
            start += n
        return responses
