"""Predict with a finished run: its tokenizer settings, its engine, its task's output.

    from pipeline.deploy.predictor import load_predictor
    p = load_predictor("outputs/minilm_l6_movie_snippets/<time>", precision="int8")
    p.predict([{"text": "a gorgeous, witty, seductive movie."}])
    # [{"label": "positive", "label_id": 1, "scores": [0.03, 0.97]}]

`Predictor` is engine-agnostic: it takes any object with `run(inputs) -> array` (pipeline.engines.Engine)
and a task's postprocess function (pipeline/deploy/postprocess.py). It tokenizes with
pipeline/deploy/textproc.py (the run's tokenizer.json, max length, truncation, token type ids, padding)
and batches as the evaluate stage does (windows sorted by length, `evaluate.batch_size` per batch, each
padded to its longest), so predicting the eval split reproduces the evaluate stage's engine outputs
batch for batch (tests/test_predict.py).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.deploy.postprocess import POSTPROCESS
from pipeline.deploy.textproc import Example, TextProcessor

# How each task reads a record (a dict from a JSONL line, or {"text": line}).
INPUT_KIND = {"sequence_classification": "text", "embedding": "text", "token_classification": "words", "question_answering": "qa"}
TOKEN_LEVEL = {"token_classification", "question_answering"}
DEPLOY_FILE = "deploy.json"  # triton/deploy.json: what the deploy stage recorded (labels, graphs, settings)


@dataclass
class RunServing:
    """Everything serving needs from a run: read from a finished run folder (`from_run_folder`) or from
    the running pipeline's context (the deploy stage)."""

    task: str
    textproc: TextProcessor
    meta: dict[str, Any]  # label_names, n_best, max_answer_length, doc_stride
    graphs: dict[str, Path]  # precision -> ONNX file of the run (int8, fp32, ...)
    plans: dict[str, Path] = field(default_factory=dict)  # precision -> TensorRT plan, when the run built one
    # precision -> the ONNX Runtime graph (what the Python-backend engine serves on CPU; the fused INT8
    # graph where the run's engine used engine.transformer_fusions)
    cpu_graphs: dict[str, Path] = field(default_factory=dict)
    output_name: str = "logits"
    output_dims: list[int] = field(default_factory=lambda: [-1])  # the graph output's dims after the batch axis
    engine_settings: dict[str, Any] = field(default_factory=dict)  # ONNX Runtime session options of the run
    batch_size: int = 64  # evaluate.batch_size
    # The CPU runtime the Python-backend model runs: the run's engine where it is a CPU engine (onnxruntime,
    # openvino), else onnxruntime (engine=tensorrt / none: the bundled server has no GPU).
    cpu_engine: str = "onnxruntime"


def graph_io(path: Path) -> tuple[list[str], str, list[int]]:
    """(input names, output name, output dims after the batch axis; -1 where dynamic) of an ONNX graph."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    out = g.output[0]
    dims = [d.dim_value if d.dim_value > 0 else -1 for d in out.type.tensor_type.shape.dim][1:]
    return [i.name for i in g.input], out.name, dims


def precision_graphs(cfg, files: dict[str, Path]) -> dict[str, Path]:
    """precision -> ONNX file for the run's engine and quant format (pipeline.engines.GRAPHS), those present."""
    from pipeline.engines import GRAPHS

    names = GRAPHS.get(cfg.engine.name, GRAPHS["onnxruntime"])[cfg.quant.format]
    return {precision: files[name] for precision, name in names.items() if name in files}


# Engine keys the Triton CPU model builds its session from (pipeline/deploy/triton_models/engine.py).
SERVING_SETTINGS = ("graph_optimization", "intra_op_threads", "allow_spinning", "transformer_fusions", "inference_precision")


def serving_spec(cfg, tokenizer, files: dict[str, Path], label_names: list[str], plans: dict[str, Path] | None = None) -> RunServing:
    """The serving description of a run from its config, its Hugging Face tokenizer, its ONNX files by
    name and its label names (what the deploy stage and `from_run_folder` both call)."""
    from pipeline.schema import engine_config

    graphs = precision_graphs(cfg, files)
    cpu_engine = cfg.engine.name if cfg.engine.name in ("onnxruntime", "openvino") else "onnxruntime"
    cpu_cfg = dataclasses.replace(cfg, engine=engine_config(cpu_engine, cfg.engine))
    cpu_graphs = precision_graphs(cpu_cfg, files)
    if cfg.engine.name == "onnxruntime" and cfg.engine.transformer_fusions:
        for precision, path in cpu_graphs.items():
            fused = path.with_name(f"{path.stem}.fused.onnx")
            if precision not in ("fp32", "fp16") and fused.is_file():
                cpu_graphs[precision] = fused
    if not graphs:
        raise FileNotFoundError("the run has no ONNX graph to serve (export=none?)")
    input_names, output_name, output_dims = graph_io(next(iter(graphs.values())))
    t = cfg.task
    meta: dict[str, Any] = {"label_names": [str(n) for n in label_names]}
    if t.name == "question_answering":  # the answer search's settings (postprocess.answers)
        meta |= {"n_best": t.n_best, "max_answer_length": t.max_answer_length}
    stride = t.doc_stride if t.name == "question_answering" else 0
    textproc = TextProcessor.from_hf(tokenizer, cfg.model.max_length, input_names, doc_stride=stride, task=t.name)
    # The CPU engine's own keys (the Triton CPU model builds its session from them; the others keep their defaults).
    settings = {k: getattr(cpu_cfg.engine, k) for k in SERVING_SETTINGS if hasattr(cpu_cfg.engine, k)}
    if cfg.engine.name == "tensorrt":
        settings["max_batch"] = cfg.engine.max_batch  # the plans' optimization profile
    return RunServing(
        t.name, textproc, meta, graphs, plans or {}, cpu_graphs, output_name, output_dims, settings, cfg.evaluate.batch_size, cpu_engine
    )


def load_run_config(run_dir: Path):
    """The typed config of a run folder (config.resolved.yaml). The schema's checks only: the run was fully
    validated (pipeline.validation) when it started, and deploy sits below the layers those rules live in."""
    from omegaconf import OmegaConf

    from pipeline.schema import ENGINE_CONFIGS, REPLACED, TASK_CONFIGS, engine_config, validate

    path = Path(run_dir) / "config.resolved.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.resolved.yaml)")
    raw = OmegaConf.load(path)
    # A run made before quant.rules: its selection keys are baked into its graphs and unused here.
    for key in REPLACED:
        group, leaf = key.split(".")
        if group in raw and leaf in raw[group]:
            raw[group].pop(leaf)
    # A run made before each engine and task had its own schema may carry keys its kind never read.
    for group, kinds in (("engine", ENGINE_CONFIGS), ("task", TASK_CONFIGS)):
        if group in raw and raw[group].get("name") in kinds:
            own = {f.name for f in dataclasses.fields(kinds[raw[group].name])}
            for key in [k for k in raw[group] if k not in own]:
                raw[group].pop(key)
    cfg = validate(raw)
    if cfg.engine.name == "auto":  # the engine the run resolved it to (metrics.json engine_choice), as measured
        cfg.engine = engine_config(_chosen_engine(Path(run_dir)), cfg.engine)
    return cfg


def _chosen_engine(run_dir: Path) -> str:
    import json

    from pipeline.engines import auto_engine

    metrics = run_dir / "metrics.json"
    chosen = json.loads(metrics.read_text()).get("engine_choice", {}).get("chosen") if metrics.is_file() else None
    return chosen or auto_engine()[0]


def run_tokenizer(cfg):
    """The Hugging Face tokenizer the run's load stage used (model.name_or_path; the embedded model's
    for model.random_init)."""
    from transformers import AutoTokenizer

    from pipeline import _embedded_model_path

    source = _embedded_model_path() if cfg.model.random_init else cfg.model.name_or_path
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)


def run_label_names(cfg, run_dir: Path) -> list[str]:
    """Class / tag names of the run: triton/deploy.json when the deploy stage wrote it, else the task's
    data loader (the same call the load stage made)."""
    recorded = Path(run_dir) / "triton" / DEPLOY_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())["meta"]["label_names"]
    from pipeline.tasks import make_task

    return make_task(cfg).load_splits(cfg.data).label_names


def from_run_folder(run_dir: str | Path) -> tuple[Any, RunServing]:
    """(typed config, serving description) of a finished run folder."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    files = {p.name: p for p in run_dir.glob("model_*.onnx")}
    plans = {p.stem.removeprefix("model_"): p for p in run_dir.glob("model_*.plan")}
    return cfg, serving_spec(cfg, run_tokenizer(cfg), files, run_label_names(cfg, run_dir), plans)


class Predictor:
    """Records -> predictions with one engine.

    Args:
        textproc: the run's tokenization (pipeline.deploy.textproc.TextProcessor).
        engine: anything with `run({input name: (batch, seq) int64}) -> (batch, ...) array`.
        postprocess: the task's (output, example, meta) -> dict (pipeline.deploy.postprocess).
        task: the task's name (how records are read: text, words, question + context).
        meta: what postprocess needs (label names, QA decoding limits).
        batch_size: windows per engine call (the evaluate stage's batch size reproduces its batches).
    """

    def __init__(
        self,
        textproc: TextProcessor,
        engine: Any,
        postprocess: Callable[[Any, Example, dict], dict],
        task: str,
        meta: dict,
        batch_size: int = 64,
    ):
        self.textproc, self.engine, self.postprocess = textproc, engine, postprocess
        self.task, self.meta, self.batch_size = task, meta, batch_size
        self.kind = INPUT_KIND[task]
        self.token_level = task in TOKEN_LEVEL

    def _check(self, r: Any) -> str | None:
        if not isinstance(r, dict):
            return f"expected a JSON object, got {type(r).__name__}"
        keys = ("question", "context") if self.kind == "qa" else ("text",)
        for k in keys:
            if not isinstance(r.get(k), str):
                return f"missing {k!r} (a string); task {self.task} reads {' + '.join(keys)}"
            if not r[k].strip():
                return f"empty {k!r}"
        if "text_pair" in r and not isinstance(r["text_pair"], str):
            return "'text_pair' must be a string"
        return None

    def encode(self, records: list[dict]) -> list[Example]:
        tp = self.textproc
        if self.kind == "qa":
            return tp.encode_qa([r["question"] for r in records], [r["context"] for r in records], int(tp.settings.get("doc_stride", 0)))
        if self.kind == "words":
            return tp.encode_words([r["text"] for r in records])
        pairs = [r.get("text_pair") for r in records]
        if all(p is None for p in pairs):
            return tp.encode([r["text"] for r in records])
        if any(p is None for p in pairs):  # mixed single texts and pairs: one call each (same encoding)
            return [self.encode([r])[0] for r in records]
        return tp.encode([r["text"] for r in records], pairs)

    def outputs(self, examples: list[Example]) -> list[list[np.ndarray]]:
        """Engine outputs per example (per window), over length-sorted batches as evaluate runs them."""
        windows = [(i, w) for i, ex in enumerate(examples) for w in range(len(ex.windows))]
        order = sorted(range(len(windows)), key=lambda k: len(examples[windows[k][0]].windows[windows[k][1]]["input_ids"]))
        out: list[list[np.ndarray | None]] = [[None] * len(ex.windows) for ex in examples]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            feats = [examples[windows[k][0]].windows[windows[k][1]] for k in idx]
            res = np.asarray(self.engine.run(self.textproc.pad(feats)))
            for j, k in enumerate(idx):
                i, w = windows[k]
                out[i][w] = res[j][: len(feats[j]["input_ids"])] if self.token_level else res[j]
        return out  # type: ignore[return-value]

    def predict(self, records: list[dict]) -> list[dict]:
        """One result per record: the task's prediction (+ "truncated": true when the input was longer
        than model.max_length tokens and was cut, as the pipeline cuts it), or {"error": why}."""
        errors = [self._check(r) for r in records]
        good = [r for r, e in zip(records, errors) if e is None]
        examples = self.encode(good) if good else []
        outs = self.outputs(examples) if examples else []
        results, k = [], 0
        for e in errors:
            if e is not None:
                results.append({"error": e})
                continue
            ex, o = examples[k], outs[k]
            k += 1
            r = self.postprocess(o if self.kind == "qa" else o[0], ex, self.meta)
            if ex.truncated:
                r["truncated"] = True
            results.append(r)
        return results


def build_engine(cfg, graph: Path, precision: str, engine_name: str | None = None, workdir: Path | None = None):
    """The run's engine on one of its graphs, built as build_engine built it (same engine config), its
    files (optimized graph, ...) written to `workdir` (default: a temporary folder, removed once the
    engine is built), never into the run folder."""
    from pipeline.engines import ENGINES
    from pipeline.schema import engine_config

    name = engine_name or cfg.engine.name
    if name == cfg.engine.name:
        engine_cfg = cfg.engine
    else:  # another engine on this CPU, with the run's settings it shares
        engine_cfg = engine_config(name, cfg.engine, **({"providers": ["CPUExecutionProvider"]} if name == "onnxruntime" else {}))
    if workdir is not None:
        return ENGINES[name]().build(Path(graph), precision, engine_cfg, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="qdq-predict-") as tmp:  # the session keeps no file open once built
        return ENGINES[name]().build(Path(graph), precision, engine_cfg, Path(tmp))


def load_predictor(run_dir: str | Path, precision: str = "int8", engine: str | None = None, batch_size: int | None = None) -> Predictor:
    """A Predictor for a finished run folder: its `precision` graph (int8 = the quantized graph, fp32 =
    the baseline; fp16 / fp8 where the run has them) on `engine` (default: the run's)."""
    from pipeline.schema import engine_config

    cfg, spec = from_run_folder(run_dir)
    if engine is not None and engine != cfg.engine.name:  # the graphs that engine builds from (pipeline.engines.GRAPHS)
        files = {p.name: p for p in Path(run_dir).glob("model_*.onnx")}
        spec.graphs = precision_graphs(dataclasses.replace(cfg, engine=engine_config(engine, cfg.engine)), files)
    wanted = _precision_label(spec, precision)
    eng = build_engine(cfg, spec.graphs[wanted], wanted, engine)
    return Predictor(spec.textproc, eng, POSTPROCESS[spec.task], spec.task, spec.meta, batch_size or spec.batch_size)


def _precision_label(spec: RunServing, precision: str) -> str:
    if precision in spec.graphs:
        return precision
    # int8 asks for the quantized graph (fp8 runs), fp32 for the baseline (fp16 on TensorRT)
    alias = {"int8": ("fp8",), "fp32": ("fp16",)}.get(precision, ())
    for a in alias:
        if a in spec.graphs:
            return a
    raise ValueError(f"precision {precision!r}: the run has {', '.join(spec.graphs)} graphs")


def eval_records(cfg, limit: int | None = None) -> list[dict]:
    """The run's eval split as predictor records (what the evaluate stage scored; `limit`: the first n)."""
    from pipeline.tasks import make_task

    split = make_task(cfg).load_splits(cfg.data).eval
    limit = cfg.evaluate.max_examples if limit is None else limit  # evaluate.max_examples caps what evaluate scored
    n = len(split) if limit is None else min(limit, len(split))
    kind = INPUT_KIND[cfg.task.name]
    if kind == "qa":
        return [{"question": split.questions[i], "context": split.contexts[i]} for i in range(n)]
    if kind == "words":
        return [{"text": " ".join(split.texts[i])} for i in range(n)]
    pairs = getattr(split, "pairs", None)
    return [{"text": split.texts[i], **({"text_pair": pairs[i]} if pairs else {})} for i in range(n)]
