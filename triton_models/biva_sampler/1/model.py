"""Triton python-backend model serving one exported ONNX graph with ONNX Runtime.

Copied into the model repository by biva-export; depends only on numpy, onnxruntime and Triton's
triton_python_backend_utils. The dynamic batcher hands over a list of requests: their inputs are
stacked, run once, and the outputs split back by row counts. Input and output names come from the
model's config.pbtxt (generated from the graph's spec).
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _param(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.dtypes = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["input"]}
        here = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        threads = int(_param(config, "intra_op_threads", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                         "CPUExecutionProvider"]
        self.session = ort.InferenceSession(os.path.join(here, _param(config, "onnx_file", "model.onnx")), opts,
                                            providers=providers)

    def execute(self, requests):
        feeds = {name: [] for name in self.inputs}
        rows = []
        for req in requests:
            for name in self.inputs:
                feeds[name].append(pb_utils.get_input_tensor_by_name(req, name).as_numpy())
            rows.append(feeds[self.inputs[0]][-1].shape[0])
        stacked = {n: np.ascontiguousarray(np.concatenate(v, axis=0), dtype=self.dtypes[n]) if len(v) > 1
                   else np.ascontiguousarray(v[0], dtype=self.dtypes[n]) for n, v in feeds.items()}
        try:
            results = self.session.run(self.outputs, stacked)
        except Exception as e:  # e.g. inconsistent row counts: answer every request with the error
            err = pb_utils.TritonError(f"onnxruntime failed: {str(e).splitlines()[0][:300]}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses, start = [], 0
        for n in rows:
            outs = [pb_utils.Tensor(name, r[start:start + n]) for name, r in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=outs))
            start += n
        return responses
