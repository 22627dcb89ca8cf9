"""The Triton model repository of a run: tokenizer -> model -> postprocess as one ensemble per precision.

    triton/
      deploy.json            what was written, from which files, with which settings
      README.md              how to serve each variant
      cpu/                   for the Triton server bundled in PyPI's nvidia-pytriton (CPU, Python backend only):
        <task>/              ensemble (INT8): tokenizer -> model_int8 -> postprocess
        <task>_fp32/         ensemble (FP32): tokenizer -> model_fp32 -> postprocess
        tokenizer/           Python backend: TEXT -> input_ids, attention_mask[, token_type_ids] (textproc.py + tokenizer.json)
        model_int8/          Python backend: this project's engine (the run's CPU engine, ONNX Runtime or OpenVINO, with
                             the run's options) on model_int8.onnx
        model_fp32/          same on model_fp32.onnx
        postprocess/         Python backend: the task's output (postprocess.py)
      nvidia/                for NVIDIA's Triton container (tritonserver with its onnxruntime / tensorrt / openvino backends):
        <task>/, <task>_fp32/          ensembles over model_int8 / model_fp32: `onnxruntime` backend on the ONNX graph,
                                       or `tensorrt_plan` where the run built a TensorRT plan
        <task>_openvino/, <task>_openvino_fp32/   ensembles over openvino_int8 / openvino_fp32 (`openvino` backend, same ONNX graphs)
        tokenizer/, postprocess/       as in cpu/

Ensemble I/O (contract): sequence_classification: input TEXT TYPE_STRING [1] -> label TYPE_STRING [1],
scores FP32 [num_labels] (softmax), truncated BOOL [1]; embedding: -> sentence_embedding FP32 [hidden]
(L2-normalized), truncated; token_classification: -> entities TYPE_STRING [1] (JSON list), truncated.
question_answering is not written: one question becomes a variable number of context windows, which an
ensemble's one-row-in-one-row-out batching cannot carry; serve it with the predictor.

Every config.pbtxt is text_format of Triton's ModelConfig protobuf (tests parse each one with
tritonclient.grpc.model_config_pb2). Files are hard links into the run folder where possible (copies
across file systems); the folder is built under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache import link_or_copy
from pipeline.deploy.predictor import RunServing

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "triton_models"
TRITON_TASKS = ("sequence_classification", "embedding", "token_classification")
BASELINES = ("fp32", "fp16")


@dataclass
class TritonSettings:
    """deploy.* of the config (schema DeployConfig): batching and instances of the served model."""

    max_batch_size: int = 32
    max_queue_delay_microseconds: int = 2000
    preferred_batch_size: tuple[int, ...] = (8, 16, 32)
    instance_count: int = 1
    instance_kind: str = "KIND_GPU"  # the NVIDIA variant's model; every Python-backend model runs on CPU

    @classmethod
    def from_config(cls, deploy) -> TritonSettings:
        return cls(
            deploy.max_batch_size,
            deploy.dynamic_batching.max_queue_delay_microseconds,
            tuple(deploy.dynamic_batching.preferred_batch_size),
            deploy.instance_group.count,
            deploy.instance_group.kind,
        )


# --- config.pbtxt text ---------------------------------------------------------------------------
def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: list[int], ragged: bool = False) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)}{" allow_ragged_batch: true" if ragged else ""} }}'


def _block(key: str, items: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict[str, Any]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def _model_config(
    name: str,
    *,
    backend: str | None = None,
    platform: str | None = None,
    max_batch_size: int,
    inputs: list[str],
    outputs: list[str],
    batching: TritonSettings | None = None,
    instances: tuple[int, str] | None = None,
    parameters: dict[str, Any] | None = None,
    default_model_filename: str | None = None,
    steps: list[str] | None = None,
) -> str:
    text = f'name: "{name}"\n'
    text += f'backend: "{backend}"\n' if backend else ""
    text += f'platform: "{platform}"\n' if platform else ""
    text += f"max_batch_size: {max_batch_size}\n"
    text += f'default_model_filename: "{default_model_filename}"\n' if default_model_filename else ""
    text += _block("input", inputs) + _block("output", outputs)
    if batching is not None:
        preferred = [b for b in batching.preferred_batch_size if b <= max_batch_size]
        text += (
            "dynamic_batching {\n"
            + (f"  preferred_batch_size: {_dims(preferred)}\n" if preferred else "")
            + f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}\n}}\n"
        )
    if instances is not None:
        text += f"instance_group [ {{ count: {instances[0]} kind: {instances[1]} }} ]\n"
    if steps:
        text += "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    return text + _parameters(parameters or {})


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'    {{ model_name: "{model}" model_version: -1{maps} }}'


# --- what each task's ensemble takes and gives ------------------------------------------------------
def _task_outputs(spec: RunServing) -> list[tuple[str, str, list[int]]]:
    """(name, type, dims) of the postprocess model's outputs = the ensemble's outputs (besides `truncated`)."""
    if spec.task == "sequence_classification":
        return [("label", "TYPE_STRING", [1]), ("scores", "TYPE_FP32", spec.output_dims)]
    if spec.task == "embedding":
        return [("sentence_embedding", "TYPE_FP32", spec.output_dims)]
    return [("entities", "TYPE_STRING", [1])]


def _words(spec: RunServing) -> bool:
    return spec.task == "token_classification"


def _tokenizer_outputs(spec: RunServing) -> list[str]:
    names = list(spec.textproc.input_names) + (["word_ids"] if _words(spec) else [])
    return names + ["truncated"]


def _write_common(spec: RunServing, repo: Path, s: TritonSettings) -> None:
    """tokenizer/ and postprocess/ (the same in both variants)."""
    mb = s.max_batch_size
    tok = repo / "tokenizer" / "1"
    tok.mkdir(parents=True)
    shutil.copyfile(TEMPLATES / "tokenizer.py", tok / "model.py")
    shutil.copyfile(HERE / "textproc.py", tok / "textproc.py")
    spec.textproc.save(tok)
    outs = [_tensor(n, "TYPE_INT64", [-1]) for n in _tokenizer_outputs(spec) if n != "truncated"] + [_tensor("truncated", "TYPE_BOOL", [1])]
    _write(
        repo / "tokenizer" / "config.pbtxt",
        _model_config(
            "tokenizer",
            backend="python",
            max_batch_size=mb,
            inputs=[_tensor("TEXT", "TYPE_STRING", [1])],
            outputs=outs,
            instances=(1, "KIND_CPU"),
        ),
    )
    post = repo / "postprocess" / "1"
    post.mkdir(parents=True)
    shutil.copyfile(TEMPLATES / "postprocess.py", post / "model.py")
    shutil.copyfile(HERE / "postprocess.py", post / "postprocess.py")
    shutil.copyfile(HERE / "textproc.py", post / "textproc.py")
    (post / "meta.json").write_text(json.dumps({"task": spec.task, **spec.meta}, indent=2) + "\n")
    inputs = [_tensor("MODEL_OUTPUT", "TYPE_FP32", spec.output_dims)]
    if _words(spec):
        inputs += [_tensor("TEXT", "TYPE_STRING", [1]), _tensor("WORD_IDS", "TYPE_INT64", [-1])]
    _write(
        repo / "postprocess" / "config.pbtxt",
        _model_config(
            "postprocess",
            backend="python",
            max_batch_size=mb,
            inputs=inputs,
            outputs=[_tensor(n, t, d) for n, t, d in _task_outputs(spec)],
            instances=(1, "KIND_CPU"),
        ),
    )


def _model_io(spec: RunServing, ragged: bool) -> tuple[list[str], list[str]]:
    return (
        [_tensor(n, "TYPE_INT64", [-1], ragged) for n in spec.textproc.input_names],
        [_tensor(spec.output_name, "TYPE_FP32", spec.output_dims)],
    )


def _ensemble(spec: RunServing, repo: Path, name: str, model: str, s: TritonSettings) -> None:
    tok_out = {n: n for n in _tokenizer_outputs(spec)}
    steps = [
        _step("tokenizer", {"TEXT": "TEXT"}, tok_out),
        _step(model, {n: n for n in spec.textproc.input_names}, {spec.output_name: "model_output"}),
    ]
    post_in = {"MODEL_OUTPUT": "model_output"} | ({"TEXT": "TEXT", "WORD_IDS": "word_ids"} if _words(spec) else {})
    steps.append(_step("postprocess", post_in, {n: n for n, _, _ in _task_outputs(spec)}))
    outputs = [_tensor(n, t, d) for n, t, d in _task_outputs(spec)] + [_tensor("truncated", "TYPE_BOOL", [1])]
    (repo / name / "1").mkdir(parents=True)  # Triton wants a version folder for every model, ensembles too
    _write(
        repo / name / "config.pbtxt",
        _model_config(
            name,
            platform="ensemble",
            max_batch_size=s.max_batch_size,
            inputs=[_tensor("TEXT", "TYPE_STRING", [1])],
            outputs=outputs,
            steps=steps,
        ),
    )


def ensemble_name(task: str, precision: str, quantized: str | None, suffix: str = "") -> str:
    """`<task>` serves the quantized graph; `<task>_<precision>` the others (e.g. sequence_classification_fp32)."""
    return f"{task}{suffix}" if precision == quantized else f"{task}{suffix}_{precision}"


def _quantized(graphs: dict[str, Path]) -> str | None:
    return next((p for p in graphs if p not in BASELINES), None)


def _cpu(spec: RunServing, repo: Path, s: TritonSettings) -> dict[str, dict]:
    _write_common(spec, repo, s)
    pad = {n: spec.textproc.pad_values[n] for n in spec.textproc.input_names}
    settings = spec.engine_settings
    quantized = _quantized(spec.cpu_graphs)
    served = {}
    for precision, graph in spec.cpu_graphs.items():
        model = f"model_{precision}"
        (repo / model / "1").mkdir(parents=True)
        shutil.copyfile(TEMPLATES / "engine.py", repo / model / "1" / "model.py")
        link_or_copy(graph, repo / model / "1" / "model.onnx")
        inputs, outputs = _model_io(spec, ragged=True)
        params = {
            "onnx_file": "model.onnx",
            # onnxruntime | openvino: the run's CPU engine, with the run's settings (as the predictor runs it)
            "runtime": spec.cpu_engine,
            "precision": precision,
            "inference_precision": settings.get("inference_precision", "default"),
            "graph_optimization": settings.get("graph_optimization", "all"),
            "intra_op_threads": settings.get("intra_op_threads", 0),
            "allow_spinning": str(bool(settings.get("allow_spinning", False))).lower(),
            "token_level": str(len(spec.output_dims) > 1).lower(),
            "pad_values": json.dumps(pad).replace('"', '\\"'),
        }
        _write(
            repo / model / "config.pbtxt",
            _model_config(
                model,
                backend="python",
                max_batch_size=s.max_batch_size,
                inputs=inputs,
                outputs=outputs,
                batching=s,
                instances=(s.instance_count, "KIND_CPU"),
                parameters=params,
            ),
        )
        name = ensemble_name(spec.task, precision, quantized)
        _ensemble(spec, repo, name, model, s)
        runtime = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}[spec.cpu_engine]
        served[name] = {"precision": precision, "model": model, "backend": f"python ({runtime})", "graph": graph.name}
    return served


def _nvidia(spec: RunServing, repo: Path, s: TritonSettings) -> dict[str, dict]:
    _write_common(spec, repo, s)
    quantized = _quantized(spec.graphs)
    served = {}
    for precision, graph in spec.graphs.items():
        model = f"model_{precision}"
        inputs, outputs = _model_io(spec, ragged=False)
        plan = spec.plans.get(precision)
        # A TensorRT plan where the run built one, else the ONNX graph on the onnxruntime backend.
        source, file, kind = (
            (plan, "model.plan", {"platform": "tensorrt_plan"}) if plan else (graph, "model.onnx", {"backend": "onnxruntime"})
        )
        (repo / model / "1").mkdir(parents=True)
        link_or_copy(source, repo / model / "1" / file)
        mb = min(s.max_batch_size, int(spec.engine_settings.get("max_batch", s.max_batch_size))) if plan else s.max_batch_size
        cfg = _model_config(
            model, **kind, max_batch_size=mb, inputs=inputs, outputs=outputs, batching=s, instances=(s.instance_count, s.instance_kind)
        )
        backend = next(iter(kind.values()))
        _write(repo / model / "config.pbtxt", cfg)
        name = ensemble_name(spec.task, precision, quantized)
        _ensemble(spec, repo, name, model, s)
        served[name] = {"precision": precision, "model": model, "backend": backend, "graph": (plan or graph).name}
    # OpenVINO reads the same Q/DQ ONNX graphs (every Linear as an i8 FullyConnected); CPU only.
    cpu_quantized = _quantized(spec.cpu_graphs)
    for precision, graph in spec.cpu_graphs.items():
        model = f"openvino_{precision}"
        (repo / model / "1").mkdir(parents=True)
        link_or_copy(graph, repo / model / "1" / "model.onnx")
        inputs, outputs = _model_io(spec, ragged=False)
        _write(
            repo / model / "config.pbtxt",
            _model_config(
                model,
                backend="openvino",
                max_batch_size=s.max_batch_size,
                default_model_filename="model.onnx",
                inputs=inputs,
                outputs=outputs,
                batching=s,
                instances=(s.instance_count, "KIND_CPU"),
            ),
        )
        name = ensemble_name(spec.task, precision, cpu_quantized, "_openvino")
        _ensemble(spec, repo, name, model, s)
        served[name] = {"precision": precision, "model": model, "backend": "openvino", "graph": graph.name}
    return served


def write_repository(spec: RunServing, dest: Path, settings: TritonSettings) -> dict:
    """Write the model repositories of `spec` into `dest` (a new folder; refuses an existing one).

    Returns deploy.json's content. Built under a temporary name beside `dest`, renamed at the end: a
    crash leaves no half-written repository."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        info: dict[str, Any] = {
            "task": spec.task,
            "meta": spec.meta,
            "textproc": spec.textproc.settings,
            "max_batch_size": settings.max_batch_size,
            "dynamic_batching": {
                "max_queue_delay_microseconds": settings.max_queue_delay_microseconds,
                "preferred_batch_size": list(settings.preferred_batch_size),
            },
            "instance_group": {"count": settings.instance_count, "kind": settings.instance_kind},
            "engine_settings": spec.engine_settings,
        }
        if spec.task in TRITON_TASKS:
            info["repositories"] = {"cpu": _cpu(spec, tmp / "cpu", settings), "nvidia": _nvidia(spec, tmp / "nvidia", settings)}
        else:
            info["repositories"] = {}
            info["not_written"] = (
                f"task {spec.task}: one input becomes a variable number of windows, which a Triton ensemble cannot batch; "
                "use the predictor (qdq-pipeline-predict)"
            )
        (tmp / "deploy.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(_readme(spec, info))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _readme(spec: RunServing, info: dict) -> str:
    lines = [
        f"# Triton model repository ({spec.task})",
        "",
        "Written by the deploy stage (pipeline/deploy/triton.py); see docs/how-to/serve.md.",
        "",
    ]
    if not info["repositories"]:
        return "\n".join(lines + [info["not_written"], ""])
    lines += [
        "- `cpu/`: the Triton server bundled in PyPI's nvidia-pytriton (Python backend): `qdq-pipeline-serve <run folder>`.",
        "- `nvidia/`: NVIDIA's Triton container, e.g.",
        "  `docker run --gpus all -p8000:8000 -v $PWD/nvidia:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\`",
        "  `sh -c 'pip install tokenizers && tritonserver --model-repository=/models'`",
        "",
        "| repository | ensemble | precision | model | backend | file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for repo, served in info["repositories"].items():
        for name, d in served.items():
            lines.append(f"| {repo} | {name} | {d['precision']} | {d['model']} | {d['backend']} | {d['graph']} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def config_files(repo: Path) -> list[Path]:
    """Every config.pbtxt under a repository folder."""
    return sorted(Path(repo).rglob("config.pbtxt"))
