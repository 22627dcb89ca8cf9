"""Issue 26: the line-by-line review of the TensorRT / ONNX Runtime GPU code, one test (or more) per finding.

No GPU and no TensorRT here: TensorRT and ONNX Runtime's GPU sessions are replaced by fakes that behave as their
documented APIs say (NVIDIA/TensorRT python/src/infer/pyCore.cpp + python/docstrings/infer/pyCoreDoc.h, 11.1;
ONNX Runtime's Python API); torch.cuda's device, stream and event calls are replaced by recorders. Each test fails
on the code before the fix.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from pipeline.engines import onnxruntime as ort_engine
from pipeline.engines import tensorrt as trt_engine
from pipeline.engines.trt_rules import check_tensorrt
from pipeline.schema import engine_config
from tests.test_trt_rules import _node, legal_model, plant_uint8_activation_qdq

ROOT = Path(__file__).resolve().parent.parent
FOREIGN = b"timing cache made on another GPU"
PROFILE = ((1, 1), (8, 128), (64, 512))  # the fake plan's (min, opt, max) per input
INPUTS = ("input_ids", "attention_mask")


# ---- a fake TensorRT (the calls TrtEngine makes, with their documented return values) ------------------------------


class FakeCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return b"cache[" + (self.data or b"fresh") + b"]+timings"


class FakeConfig:
    """IBuilderConfig: set_timing_cache returns False (and attaches nothing) for a cache of another GPU / version."""

    def __init__(self):
        self.attached = None
        self.calls: list = []

    def set_memory_pool_limit(self, pool, size):
        self.calls.append(("workspace", size))

    def add_optimization_profile(self, profile):
        self.calls.append(("profile", profile.shapes))

    def create_timing_cache(self, data: bytes):
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache.data == FOREIGN and not ignore_mismatch:
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        return self.attached


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


class FakeNetwork:
    num_inputs = len(INPUTS)

    def get_input(self, i):
        return SimpleNamespace(name=INPUTS[i])


class FakeParser:
    num_errors = 0

    def __init__(self, network, logger):
        pass

    def parse_from_file(self, path):
        return True


class FakeInspector:
    """IEngineInspector: format information only when the inspected context has every input shape set."""

    def __init__(self, engine):
        self.engine = engine
        self.execution_context = None

    def get_engine_information(self, fmt) -> str:
        ctx = self.execution_context
        shaped = ctx is not None and all(n in ctx.shapes for n in INPUTS)

        def tensor(name, dtype):
            return {"Name": name, "Format": "Row major linear", "DataType": dtype} if shaped else {"Name": name, "Dimensions": [-1, -1]}

        layers = [
            {"Name": "qkv_gemm", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [tensor("a", "Int8"), tensor("w", "Int8")]},
            {"Name": "ln", "LayerType": "Normalization", "Inputs": [tensor("h", "Half")]},
        ]
        io = [{"Name": n, "IOMode": "Input", "DataType": "Int64"} for n in INPUTS] + [
            {"Name": "logits", "IOMode": "Output", "DataType": "Float"}
        ]
        return json.dumps({"I/O Tensors": io, "Layers": layers})


class FakeContext:
    """IExecutionContext: set_input_shape returns False outside the profile; execute_async_v3 records its stream."""

    def __init__(self, engine, log):
        self.engine, self.log = engine, log
        self.shapes: dict[str, tuple] = {}
        self.refuse: set[tuple] = set()

    def set_input_shape(self, name, shape) -> bool:
        lo, _, hi = PROFILE
        ok = all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)) and tuple(shape) not in self.refuse
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def infer_shapes(self):
        return [n for n in INPUTS if n not in self.shapes]

    def get_tensor_shape(self, name):
        return (self.shapes["input_ids"][0], 2)

    def set_tensor_address(self, name, ptr) -> bool:
        return True

    def execute_async_v3(self, stream_handle) -> bool:
        self.log.append(("enqueue", stream_handle))
        return True


class FakeEngine:
    num_io_tensors = len(INPUTS) + 1

    def __init__(self, log):
        self.log = log

    def get_tensor_name(self, i):
        return (*INPUTS, "logits")[i]

    def get_tensor_mode(self, name):
        return "OUT" if name == "logits" else "IN"

    def get_tensor_profile_shape(self, name, profile_index):
        return [list(s) for s in PROFILE]

    def get_tensor_dtype(self, name):
        return "f32"

    def create_execution_context(self):
        return FakeContext(self, self.log)

    def create_engine_inspector(self):
        return FakeInspector(self)


def fake_trt(log: list, version: str = "11.1.0") -> SimpleNamespace:
    class Builder:
        def __init__(self, logger):
            log.append(("builder",))

        def create_network(self, flags):
            return FakeNetwork()

        def create_builder_config(self):
            cfg = FakeConfig()
            log.append(("config", cfg))
            return cfg

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, network, config):
            log.append(("build", config.attached))
            return b"PLAN"

    return SimpleNamespace(
        __version__=version,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder,
        OnnxParser=FakeParser,
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda plan: FakeEngine(log)),
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0),
        ProfilingVerbosity=SimpleNamespace(DETAILED=2),
        LayerInformationFormat=SimpleNamespace(JSON=1),
        TensorIOMode=SimpleNamespace(INPUT="IN", OUTPUT="OUT"),
        float32="f32",
        float16="f16",
        bfloat16="bf16",
    )


class FakeStream:
    def __init__(self, log, handle):
        self.log, self.cuda_stream = log, handle

    def synchronize(self):
        self.log.append(("sync", self.cuda_stream))


class FakeEvent:
    count = 0

    def __init__(self, log, enable_timing=False):
        FakeEvent.count += 1
        self.log, self.id = log, FakeEvent.count

    def record(self, stream):
        self.log.append(("record", self.id, stream.cuda_stream))

    def elapsed_time(self, end) -> float:
        return 1.25


@pytest.fixture
def fake_gpu(monkeypatch):
    """A fake tensorrt module and torch.cuda recorders; returns the shared call log."""
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(log))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(("set_device", str(d))))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(log, 0x5EED))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(log, 0))  # the legacy default stream
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: FakeEvent(log, enable_timing))
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    return log


def _graph(tmp_path: Path, fmt: str = "int8") -> Path:
    path = tmp_path / f"model_{fmt}_trt.onnx"
    onnx.save(legal_model(fmt), path)
    return path


def _engine(tmp_path: Path, **cfg) -> trt_engine.TrtEngine:
    cfg = {"name": "tensorrt", "timing_cache": str(tmp_path / "cache" / "timing.cache")} | cfg
    e = trt_engine.TrtEngine(_graph(tmp_path), "int8", engine_config(**cfg), tmp_path)
    e.device = torch.device("cpu")  # the fake "GPU" tensors live on the CPU
    return e


def _inputs(batch: int, seq: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((batch, seq), 1000, np.int64), "attention_mask": np.ones((batch, seq), np.int64)}


# ---- finding 1: a timing cache TensorRT refuses ---------------------------------------------------------------------


def test_timing_cache_is_keyed_by_gpu_and_tensorrt_version():
    cfg = engine_config("tensorrt", None, timing_cache="outputs/.cache/tensorrt/timing.cache")
    h100 = trt_engine.timing_cache_path(cfg, "NVIDIA H100 80GB HBM3", "11.1.0.106")
    assert h100 == Path("outputs/.cache/tensorrt/timing.nvidia-h100-80gb-hbm3.trt11.1.0.106.cache")
    assert trt_engine.timing_cache_path(cfg, "NVIDIA H200", "11.1.0.106") != h100
    assert trt_engine.timing_cache_path(cfg, "NVIDIA H100 80GB HBM3", "10.15.1") != h100
    assert trt_engine.timing_cache_path(engine_config("tensorrt", None, timing_cache=None), "x", "11") is None


def test_foreign_timing_cache_is_replaced_by_a_fresh_one_and_the_plan_is_written(fake_gpu, tmp_path, caplog):
    path = trt_engine.timing_cache_path(
        engine_config("tensorrt", None, timing_cache=str(tmp_path / "cache" / "timing.cache")), "NVIDIA H100 80GB HBM3", "11.1.0"
    )
    path.parent.mkdir(parents=True)
    path.write_bytes(FOREIGN)  # set_timing_cache(..., ignore_mismatch=False) returns False for it
    e = _engine(tmp_path)
    assert (tmp_path / "model_int8.plan").read_bytes() == b"PLAN"
    built_with = next(entry[1] for entry in fake_gpu if entry[0] == "build")
    assert built_with is not None and built_with.data == b""  # the build ran with a fresh cache attached
    assert path.read_bytes() == b"cache[fresh]+timings"  # and that cache replaced the foreign file
    assert e.files["timing_cache"] == path
    assert "was refused" in caplog.text
    # The next build attaches that cache as it is (no refusal) and extends it.
    caplog.clear()
    (tmp_path / "again").mkdir()
    _engine(tmp_path / "again", timing_cache=str(tmp_path / "cache" / "timing.cache"))
    assert "was refused" not in caplog.text
    assert path.read_bytes() == b"cache[cache[fresh]+timings]+timings"


def test_attach_timing_cache_never_leaves_the_build_without_a_cache_it_can_serialize(tmp_path):
    config = FakeConfig()
    cache_file = tmp_path / "t.cache"
    cache_file.write_bytes(FOREIGN)
    cache = trt_engine.attach_timing_cache(config, cache_file)
    assert cache is config.get_timing_cache() and cache.data == b""
    trt_engine.save_timing_cache(config, cache, cache_file)
    assert cache_file.read_bytes() == b"cache[fresh]+timings"
    refusing = FakeConfig()
    refusing.set_timing_cache = lambda cache, ignore_mismatch: False
    assert trt_engine.attach_timing_cache(refusing, cache_file) is None  # built without a cache, nothing to save
    trt_engine.save_timing_cache(refusing, None, cache_file)


# ---- finding 2: the inspector needs the input shapes ----------------------------------------------------------------


def test_inspector_reads_a_context_with_every_input_shape_set(fake_gpu, tmp_path):
    e = _engine(tmp_path)
    assert e.context.shapes == {n: PROFILE[1] for n in INPUTS}  # the profile's opt shape
    saved = json.loads((tmp_path / "model_int8.inspector.json").read_text())
    assert saved["Layers"][0]["Inputs"][0]["DataType"] == "Int8"
    assert (e.kernels["gemm_int8"], e.kernels["gemm_unknown"]) == (1, 0)


def test_without_shapes_the_same_engine_reads_unknown(fake_gpu):
    # What the fix prevents: an inspector on a context without shapes states no formats -> every layer "unknown".
    engine = FakeEngine(fake_gpu)
    inspector = engine.create_engine_inspector()
    inspector.execution_context = engine.create_execution_context()
    summary = trt_engine.parse_inspector(inspector.get_engine_information(None))
    assert (summary["gemm_int8"], summary["gemm_by_precision"]) == (0, {"unknown": 1})
    shaped = trt_engine.inspect_engine(fake_trt([]), engine, engine.create_execution_context(), list(INPUTS))
    assert trt_engine.parse_inspector(shaped)["gemm_int8"] == 1


def test_inspect_engine_refuses_when_shapes_stay_unset(fake_gpu):
    engine = FakeEngine(fake_gpu)
    context = engine.create_execution_context()
    context.refuse.add(PROFILE[1])
    with pytest.raises(RuntimeError, match=r"refused the profile's opt shape \(8, 128\) for input input_ids"):
        trt_engine.inspect_engine(fake_trt([]), engine, context, list(INPUTS))


# ---- finding 3: a dedicated stream, CUDA events over back-to-back enqueues ------------------------------------------


def test_enqueues_go_to_the_engine_stream_never_the_default_stream(fake_gpu, tmp_path):
    e = _engine(tmp_path)
    y = e.run(_inputs(2, 16))
    assert y.shape == (2, 2) and y.dtype == np.float32
    e.bind(_inputs(3, 8))()
    enqueues = [entry for entry in fake_gpu if entry[0] == "enqueue"]
    assert enqueues and all(handle == e.stream.cuda_stream != 0 for _, handle in enqueues)
    assert ("sync", 0) not in fake_gpu  # the default stream is never waited on either


def test_time_measures_back_to_back_enqueues_with_cuda_events(fake_gpu, tmp_path):
    e = _engine(tmp_path)
    start = len(fake_gpu)
    times = e.time(_inputs(8, 128), warmup=2, iters=4)
    assert times == [1.25] * 4
    calls = fake_gpu[start:]
    stream = e.stream.cuda_stream
    assert calls[:2] == [("enqueue", stream)] * 2  # warm-up
    timed = calls[2:-1]
    assert [c[0] for c in timed] == ["record", "enqueue", "record"] * 4  # no host sync between timed enqueues
    assert all(c[-1] == stream for c in timed)  # events recorded on the engine's own stream
    assert calls[-1] == ("sync", stream)  # one synchronization, at the end


# ---- lower: device, FP8 capability, profile errors, versions, driver ------------------------------------------------


def test_device_id_is_made_current_before_tensorrt_builds(fake_gpu, tmp_path):
    _engine(tmp_path, device_id=1)
    kinds = [entry[0] for entry in fake_gpu]
    assert fake_gpu[kinds.index("set_device")] == ("set_device", "cuda:1")
    assert kinds.index("set_device") < kinds.index("builder")


def test_fp8_plan_refused_below_compute_capability_8_9(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"FP8 plan on NVIDIA A100-SXM4-80GB \(compute capability 8.0\).* 8.9 or later"):
        trt_engine.TrtEngine(_graph(tmp_path, "fp8"), "fp8", engine_config("tensorrt", None, timing_cache=None), tmp_path)
    assert ("builder",) not in fake_gpu  # refused before any build


def test_shape_outside_the_profile_gets_a_clear_error(fake_gpu, tmp_path):
    e = _engine(tmp_path)
    with pytest.raises(
        ValueError, match=r"input input_ids shape \(65, 128\) is outside the plan's optimization profile: min \(1, 1\), max \(64, 512\)"
    ):
        e.run(_inputs(65, 128))
    e.context.refuse.add((3, 77))  # inside the profile, refused by TensorRT: its result is checked too
    with pytest.raises(RuntimeError, match=r"refused input input_ids of shape \(3, 77\) \(set_input_shape returned False"):
        e.run(_inputs(3, 77))


@pytest.mark.parametrize(("version", "refused"), [("10.8.0", True), ("10.11.1", True), ("10.12.0", False), ("11.1.0", False)])
def test_tensorrt_10x_needs_10_12(monkeypatch, version, refused):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt([], version))
    problems = trt_engine.check(engine_config("tensorrt"))
    assert any("on 10.x this engine needs 10.12 or later" in p for p in problems) == refused


def test_driver_too_old_for_the_cuda_13_wheels(monkeypatch):
    assert trt_engine.driver_problems("11.1.0", 13, "580.65.06") == []
    assert trt_engine.driver_problems("11.1.0", 12, "550.54.15") == []  # CUDA 12 wheels: r535+
    assert trt_engine.driver_problems("11.1.0", None, "450.1") == []  # unknown build: not guessed
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt([], "11.1.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_engine, "tensorrt_cuda_major", lambda: 13)
    monkeypatch.setattr(trt_engine, "driver_version", lambda: "550.54.15")
    assert trt_engine.check(engine_config("tensorrt")) == [
        "engine=tensorrt: TensorRT 11.1.0 is the CUDA 13 build, which needs NVIDIA driver r580 or later; this machine has "
        "550.54.15: update the driver or install the CUDA 12 build (tensorrt-cu12)"
    ]


# ---- a fake onnxruntime for the GPU providers ------------------------------------------------------------------------


class FakeSession:
    def __init__(self, path, so, providers, active, profile):
        names = [p if isinstance(p, str) else p[0] for p in providers]
        if getattr(so, "optimized_model_filepath", "") and "TensorrtExecutionProvider" in names:
            raise RuntimeError("cannot save an optimized model with TensorRT-compiled nodes")  # what the review found
        if getattr(so, "optimized_model_filepath", ""):
            Path(so.optimized_model_filepath).write_bytes(Path(path).read_bytes())
        self.path, self.so, self.providers, self.active, self.profile = path, so, providers, active, profile

    def get_providers(self):
        return list(self.active)

    def get_inputs(self):
        return [SimpleNamespace(name=i.name) for i in onnx.load(self.path).graph.input]

    def get_outputs(self):
        return [SimpleNamespace(name="logits")]

    def run(self, names, feed):
        return [np.zeros((1, 2), np.float32)]

    def end_profiling(self):
        path = Path(self.so.profile_file_prefix + ".json")
        path.write_text(json.dumps(self.profile))
        return str(path)


def fake_ort(active: list[str], profile: list | None = None, version: str = "1.27.0") -> SimpleNamespace:
    sessions: list[FakeSession] = []

    def session(path, so, providers):
        sessions.append(FakeSession(path, so, providers, active, profile or []))
        return sessions[-1]

    return SimpleNamespace(
        __version__=version,
        SessionOptions=lambda: SimpleNamespace(add_session_config_entry=lambda k, v: None),
        GraphOptimizationLevel=SimpleNamespace(ORT_DISABLE_ALL=0, ORT_ENABLE_BASIC=1, ORT_ENABLE_EXTENDED=2, ORT_ENABLE_ALL=99),
        InferenceSession=session,
        get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        sessions=sessions,
    )


def _node_event(op: str, provider: str, name: str) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"op_name": op, "provider": provider}}


TRT_CUDA = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


# ---- finding 4: no optimized-graph file with the TensorRT provider --------------------------------------------------


def test_tensorrt_provider_session_is_made_without_an_optimized_model_file(monkeypatch, tmp_path):
    fake = fake_ort(active=TRT_CUDA)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    e = ort_engine.OrtEngine(_graph(tmp_path), "int8", engine_config("onnxruntime", None, providers=TRT_CUDA), tmp_path)
    assert not getattr(fake.sessions[0].so, "optimized_model_filepath", "")
    assert "optimized_graph" not in e.files and e.kernels == {}
    # The CPU provider still saves and counts it.
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=["CPUExecutionProvider"]))
    cpu = ort_engine.OrtEngine(_graph(tmp_path), "int8", engine_config("onnxruntime"), tmp_path)
    assert cpu.files["optimized_graph"].exists()


# ---- finding 5: the session's active providers ----------------------------------------------------------------------


@pytest.mark.parametrize("asked", [["CUDAExecutionProvider", "CPUExecutionProvider"], TRT_CUDA])
def test_a_silent_fallback_is_refused(monkeypatch, tmp_path, asked):
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=["CPUExecutionProvider"]))
    with pytest.raises(RuntimeError, match=rf"did not start {asked[0]} for model_int8_trt.onnx: the session runs on CPUExecutionProvider"):
        ort_engine.OrtEngine(_graph(tmp_path), "int8", engine_config("onnxruntime", None, providers=asked), tmp_path)


def test_qdq_graph_on_cuda_is_emulated_unless_an_int8_kernel_ran_on_cuda(monkeypatch, tmp_path):
    cfg = engine_config("onnxruntime", None, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    floats = [_node_event("DequantizeLinear", "CUDAExecutionProvider", "dq"), _node_event("MatMul", "CUDAExecutionProvider", "mm")]
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=cuda, profile=floats))
    e = ort_engine.OrtEngine(_graph(tmp_path), "int8", cfg, tmp_path)
    assert e.emulated and e.on_gpu  # measured for accuracy, not timed
    # An int8 kernel that ran on the CPU provider proves nothing about CUDA.
    cpu_int8 = floats + [_node_event("MatMulIntegerToFloat", "CPUExecutionProvider", "mm_cpu")]
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=cuda, profile=cpu_int8))
    assert ort_engine.OrtEngine(_graph(tmp_path), "int8", cfg, tmp_path).emulated
    proven = floats + [_node_event("MatMulInteger", "CUDAExecutionProvider", "mmi")]
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=cuda, profile=proven))
    e = ort_engine.OrtEngine(_graph(tmp_path), "int8", cfg, tmp_path)
    assert not e.emulated and e.kernels["cuda_MatMulInteger"] == 1
    # FP32 on CUDA is not a quantized graph: never profiled, never emulated.
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=cuda))
    assert not ort_engine.OrtEngine(_graph(tmp_path), "fp32", cfg, tmp_path).emulated


def test_ops_by_provider_reads_a_real_onnx_runtime_profile(tmp_path):
    import onnxruntime as ort

    path = _graph(tmp_path)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.ones((1, 2, 8), np.float32)})
    ran = ort_engine.ops_by_provider(Path(s.end_profiling()))
    assert list(ran) == ["CPUExecutionProvider"] and sum(ran["CPUExecutionProvider"].values()) >= 3


# ---- finding 6: the TensorRT provider gets TensorRT's graphs, the profile and caches ----------------------------------


def test_tensorrt_provider_builds_from_tensorrt_graphs():
    trt_first = engine_config("onnxruntime", None, providers=TRT_CUDA)
    assert ort_engine.provider_graphs(trt_first, "int8") == {"fp16": "model_fp16.onnx", "int8": "model_int8_trt.onnx"}
    assert ort_engine.provider_graphs(trt_first, "fp8") == {"fp16": "model_fp16.onnx", "fp8": "model_fp8.onnx"}
    assert ort_engine.provider_graphs(engine_config("onnxruntime", None, providers=["CUDAExecutionProvider"]), "int8") is None
    assert ort_engine.provider_graphs(engine_config("onnxruntime"), "int8") is None


def test_tensorrt_provider_refuses_a_uint8_qdq_graph(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(active=TRT_CUDA))
    m = legal_model("int8")
    plant_uint8_activation_qdq(m)  # model_int8.onnx's softmax Q/DQ is UINT8
    onnx.save(m, tmp_path / "model_int8.onnx")
    with pytest.raises(ValueError, match=r"model_int8.onnx is not a graph for TensorrtExecutionProvider .*model_int8_trt.onnx"):
        ort_engine.OrtEngine(tmp_path / "model_int8.onnx", "int8", engine_config("onnxruntime", None, providers=TRT_CUDA), tmp_path)


def test_tensorrt_provider_options_carry_the_engine_profile_and_caches(monkeypatch, tmp_path):
    cfg = engine_config(
        "onnxruntime", None, providers=TRT_CUDA, min_seq=4, max_batch=32, max_seq=256, timing_cache=str(tmp_path / "c" / "t.cache")
    )
    opts = ort_engine.tensorrt_provider_options(cfg, ["input_ids", "attention_mask"], tmp_path / "trt")
    assert opts["trt_profile_min_shapes"] == "input_ids:1x4,attention_mask:1x4"
    assert opts["trt_profile_opt_shapes"] == "input_ids:8x128,attention_mask:8x128"
    assert opts["trt_profile_max_shapes"] == "input_ids:32x256,attention_mask:32x256"
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert "trt_fp16_enable" not in opts and "trt_int8_enable" not in opts  # the graph's types are the precision
    # In the session: merged with the user's provider_options (the user's win), cache folders made.
    fake = fake_ort(active=TRT_CUDA)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    user = dataclasses.replace(cfg, provider_options={"TensorrtExecutionProvider": {"trt_builder_optimization_level": 5}})
    ort_engine.OrtEngine(_graph(tmp_path), "int8", user, tmp_path)
    name, given = fake.sessions[0].providers[0]
    assert name == "TensorrtExecutionProvider" and given["trt_builder_optimization_level"] == 5
    assert given["trt_profile_opt_shapes"] == "x:8x128"
    assert Path(given["trt_engine_cache_path"]).is_dir() and Path(given["trt_engine_cache_path"]).is_relative_to(tmp_path / "c")


def test_onnxruntime_release_that_loads_tensorrt_11():
    assert ort_engine.trt_provider_problems("1.27.0", "11.1.0.106") == []
    assert ort_engine.trt_provider_problems("1.24.1", "10.15.1") == []
    (problem,) = ort_engine.trt_provider_problems("1.24.1", "11.1.0.106")
    assert "loads TensorRT 10.x only" in problem and "onnxruntime-gpu>=1.27" in problem


# ---- finding 7: an explicit per-channel axis ------------------------------------------------------------------------


def test_per_channel_weight_without_an_explicit_axis_is_a_violation():
    m = legal_model("int8")
    assert check_tensorrt(m) == []
    dq = _node(m, "w1_dq")  # W1 [K, N], per-channel on N: ONNX's default axis 1 is right, TensorRT's default 0 is not
    del dq.attribute[:]
    (v,) = check_tensorrt(m)
    assert (v.rule, v.node) == ("per-channel", "w1_dq")
    assert "without an explicit axis: ONNX reads it as axis 1, TensorRT's parser as axis 0; write axis=1 explicitly" in v.message


# ---- finding 8: the GPU check proves the engine, or says why not -----------------------------------------------------


def _gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    return r, json.loads((tmp_path / "gpu_check.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's answers")
def test_gpu_check_probe_and_require_cuda_on_a_cpu_machine(tmp_path):
    r, rec = _gpu_check(tmp_path / "plain", "--only", "probe,cuda,ort-cuda,time")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {row["key"]: row["status"] for row in rec["rows"]} == {
        "probe": "ok",
        "cuda": "skipped",
        "ort-cuda": "skipped",
        "time": "skipped",
    }
    assert rec["probe"]["gpu"] is None and rec["probe"]["onnxruntime"]
    assert (tmp_path / "plain" / "gpu_check.log").read_text().count("summary: 1 ok, 3 skipped, 0 failed") == 1
    r, rec = _gpu_check(tmp_path / "required", "--only", "probe,cuda", "--require-cuda")
    assert r.returncode == 1
    assert [row["status"] for row in rec["rows"]] == ["ok", "FAIL"] and rec["exit"] == 1
    assert r.stdout.rstrip().splitlines()[-1] == "summary: 1 ok, 0 skipped, 1 failed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's answers")
def test_require_tensorrt_fails_every_tensorrt_row_that_could_not_build_or_run(tmp_path):
    keys = "tensorrt,trt-int8,trt-layers,trt-parity,trt-shapes,trt-cache,trt-latency,trt-fp8"
    r, rec = _gpu_check(tmp_path / "req", "--only", keys, "--require-tensorrt")
    assert r.returncode == 1
    assert {row["key"]: row["status"] for row in rec["rows"]} == dict.fromkeys(keys.split(","), "FAIL")
    assert all("required (--require-tensorrt) but missing" in row["detail"] for row in rec["rows"])
    r, rec = _gpu_check(tmp_path / "plain", "--only", keys)  # not asked for: skipped, saying why
    assert r.returncode == 0 and {row["status"] for row in rec["rows"]} == {"skipped"}
    assert "no CUDA GPU visible to torch" in rec["rows"][1]["detail"]
