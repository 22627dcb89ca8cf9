"""Triton Python backend: this project's engine on the run's graph — the run's CPU engine (parameter
`runtime`): an ONNX Runtime session with the run's session options, or an OpenVINO compiled model with
the run's precision hints (a float graph in the precision it is labelled with; an INT8 graph's float
layers as engine.inference_precision says) — behind Triton's dynamic batcher.

The batcher hands over several requests at once (inputs marked allow_ragged_batch: each request keeps
its own sequence length); they are padded to the longest of them, run as one batch and split back, each
request's token-level output cut to its own length. A request with wrong inputs gets an error response;
the others are answered.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


# precision of a float graph -> the OpenVINO hint it must run in (pipeline/engines/openvino.py, the same rule)
_FLOAT_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


class _OpenVINO:
    """The graph compiled by OpenVINO's CPU plugin, as pipeline/engines/openvino.py compiles it."""

    def __init__(self, path, p):
        import openvino as ov

        core = ov.Core()
        props = {"PERFORMANCE_HINT": "LATENCY"}
        hint = _FLOAT_HINTS.get(p.get("precision", ""))
        asked = p.get("inference_precision", "default")
        if hint is None and asked == "auto":  # pipeline/engines/openvino.py float_layer_precision: f32 unless AMX
            hint = None if "amx_bf16" in _cpu_flags() else "f32"
        elif hint is None and asked != "default":
            hint = asked
        if hint is not None:
            props["INFERENCE_PRECISION_HINT"] = hint
        if int(p.get("intra_op_threads", "0")):
            props["INFERENCE_NUM_THREADS"] = int(p["intra_op_threads"])
        self.compiled = core.compile_model(core.read_model(path), "CPU", props)
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.dtypes = {i.get_any_name(): i.get_element_type().to_dtype() for i in self.compiled.inputs}
        self.request = self.compiled.create_infer_request()

    def run(self, feed):
        out = self.request.infer({k: np.ascontiguousarray(feed[k], dtype=self.dtypes[k]) for k in self.inputs})
        return np.array(out[0], dtype=np.float32)


class _OnnxRuntime:
    def __init__(self, path, p):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[p.get("graph_optimization", "all")])
        if int(p.get("intra_op_threads", "0")):
            so.intra_op_num_threads = int(p["intra_op_threads"])
        if p.get("allow_spinning", "false") != "true":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.graph_output = self.session.get_outputs()[0].name

    def run(self, feed):
        return self.session.run([self.graph_output], feed)[0]


_RUNTIMES = {"onnxruntime": _OnnxRuntime, "openvino": _OpenVINO}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.engine = _RUNTIMES[p.get("runtime", "onnxruntime")](os.path.join(folder, p.get("onnx_file", "model.onnx")), p)
        self.inputs = self.engine.inputs
        self.output = config["output"][0]["name"]
        self.pad = json.loads(p["pad_values"])
        self.token_level = p.get("token_level", "false") == "true"

    def _read(self, request):
        arrays = {}
        for name in self.inputs:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise ValueError(f"missing input {name}")
            a = t.as_numpy()
            if a.ndim != 2:
                raise ValueError(f"{name}: expected (batch, sequence), got shape {a.shape}")
            arrays[name] = a.astype(np.int64, copy=False)
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1:
            raise ValueError(f"inputs of different shapes: {sorted(shapes)}")
        return arrays

    def execute(self, requests):
        responses = [None] * len(requests)
        batch = []
        for n, request in enumerate(requests):
            try:
                batch.append((n, self._read(request)))
            except Exception as exc:
                responses[n] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"engine: {exc}"))
        if batch:
            seq = max(a["input_ids"].shape[1] for _, a in batch)
            feed = {}
            for name in self.inputs:
                parts = []
                for _, a in batch:
                    x = a[name]
                    parts.append(np.pad(x, ((0, 0), (0, seq - x.shape[1])), constant_values=self.pad[name]) if x.shape[1] < seq else x)
                feed[name] = np.concatenate(parts)
            try:
                out = self.engine.run(feed)
                row = 0
                for n, a in batch:
                    b, s = a["input_ids"].shape
                    part = out[row : row + b]
                    row += b
                    if self.token_level:
                        part = part[:, :s]
                    responses[n] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, np.ascontiguousarray(part))])
            except Exception as exc:
                for n, _ in batch:
                    responses[n] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"engine: {exc}"))
        return responses
