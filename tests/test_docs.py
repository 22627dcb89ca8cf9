"""The documentation: the generated configuration reference covers every schema key and conf/ option,
every page in the nav exists, and the calibration figure module works with and without histograms."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference():
    return _load("docs_reference")


def test_reference_covers_every_schema_key(reference):
    text = reference.render_config()
    keys = reference.schema_keys()
    assert len(keys) > 100  # every group's keys, not a subset
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"schema keys missing from the generated reference: {missing}"
    # Spot checks: type, default, allowed values and range come from the schema.
    row = next(line for line in text.splitlines() if line.startswith("| `calibration.percentile` |"))
    assert "float" in row and "`99.99`" in row and "0.0 … 100.0" in row
    row = next(line for line in text.splitlines() if line.startswith("| `calibration.method` |"))
    for v in ("`max`", "`percentile`", "`entropy`", "`mse`", "`none`"):
        assert v in row


def test_reference_lists_every_conf_option(reference):
    text = reference.render_config()
    for group, options in reference.conf_options().items():
        for option in options:
            if "/" in option:  # hydra/launcher/*: listed by the group table
                assert option in text, (group, option)
            else:
                assert f"`{option}`" in text or f"`{group}={option}`" in text, (group, option)


def test_every_nav_page_exists_and_config_page_is_generated():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))

    def pages(nav):
        for item in nav:
            for v in item.values() if isinstance(item, dict) else [item]:
                yield from pages(v) if isinstance(v, list) else [v]

    nav = list(pages(cfg["nav"]))
    assert "reference/config.md" in nav
    assert not (ROOT / "docs" / "reference" / "config.md").exists(), "generated at build time, never committed"
    missing = [p for p in nav if p != "reference/config.md" and not (ROOT / "docs" / p).exists()]
    assert not missing, missing
    # Every snippet a page includes exists (the strict build checks it too).
    for page in (ROOT / "docs").rglob("*.md"):
        for snip in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            assert (ROOT / "docs" / "snippets" / snip).exists(), (page, snip)


def _run_dir(tmp_path: Path, hist: bool) -> Path:
    rng = np.random.default_rng(0)
    qmap = []
    state = {}
    for i, (role, scale) in enumerate([("linear_input", 1.0), ("attn_probs", 0.05), ("linear_input", 4.0)]):
        name = f"bert.encoder.layer.{i}.q{i}.input_quantizer"
        x = np.abs(rng.standard_t(3, 100_000) * scale).astype(np.float32)
        counts, edges = np.histogram(x, bins=2048, range=(0, x.max()))
        state[f"{name}.hist"] = torch.tensor(counts, dtype=torch.float32)
        state[f"{name}.edges"] = torch.tensor(edges, dtype=torch.float32)
        qmap.append(
            {
                "name": name,
                "role": role,
                "axis": None,
                "unsigned": role == "attn_probs",
                "num_bits": 8,
                "amax": float(x.max()),
                "enabled": True,
            }
        )
    qmap.append({"name": "w", "role": "linear_weight", "axis": 0, "unsigned": False, "num_bits": 8, "amax": {"min": 0.1}, "enabled": True})
    (tmp_path / "quant_map.json").write_text(json.dumps(qmap))
    if hist:
        save_file(state, str(tmp_path / "calibration_histograms.safetensors"))
    return tmp_path


def test_calibration_figure_from_histograms(tmp_path):
    from pipeline.quantization import calibration_plot as cp

    run = _run_dir(tmp_path, hist=True)
    hists = cp.load(run, {"percentile": 99.99, "stride": 1, "start_bin": 128})
    assert len(hists) == 3
    for h in hists:
        assert set(h.amax) == set(cp.METHODS)
        # max is the top of the histogram; percentile 99.99 clips at most 0.01 % of the values.
        assert h.amax["percentile"] <= h.amax["max"] + 1e-6
        assert h.error(h.amax["percentile"])["clipped"] <= 1e-4 + 1e-9
        assert h.error(h.amax["max"])["clipped"] == 0
    lines = cp.report_lines(run, "percentile")
    assert (run / "calibration.png").stat().st_size > 1000
    assert "![calibration](calibration.png)" in lines
    assert "chosen method (percentile)" in " ".join(lines)


def test_calibration_figure_with_max_has_no_histograms(tmp_path):
    from pipeline.quantization import calibration_plot as cp

    run = _run_dir(tmp_path, hist=False)
    lines = cp.report_lines(run, "max")
    assert (run / "calibration.png").exists()
    assert "collects no histograms" in " ".join(lines)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cp.plot(empty, "none")[0] is None


def test_calibration_png_in_real_runs_cached_and_max(tmp_path):
    """A tiny pipeline run writes calibration.png from its own calibration pass; a rerun whose calibrate
    stage comes from the cache draws it from the cached histograms; calibration=max says why it has none."""
    from pipeline.quantization import calibration_plot as cp
    from pipeline.testing import run_tiny

    light = ["qat=none", "export=none", "engine=none", "benchmark=none"]  # calibrate + report are what is tested
    first = run_tiny(tmp_path, light, name="first")
    second = run_tiny(tmp_path, light, name="second")
    assert second.stages["calibrate"].status == "cached"
    for ctx in (first, second):
        report = (ctx.run_dir / "report.md").read_text()
        assert "![calibration](calibration.png)" in report
        assert (ctx.run_dir / "calibration.png").stat().st_size > 1000
        assert len(cp.load(ctx.run_dir)) == sum(1 for r in json.loads((ctx.run_dir / "quant_map.json").read_text()) if r["axis"] is None)
    a, b = (cp.load(c.run_dir)[0] for c in (first, second))
    assert np.array_equal(a.counts, b.counts) and a.amax == b.amax
    mx = run_tiny(tmp_path, [*light, "calibration=max"], name="max")
    assert not (mx.run_dir / cp.HISTOGRAMS).exists()
    assert "collects no histograms" in (mx.run_dir / "report.md").read_text()


def test_readme_links_into_docs_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
    for section in ("## Two commands", "## What runs where", "## Peer comparison (ONNX Runtime's own quantizers)", "## Scaling out"):
        assert section in text


def test_docs_numbers_are_the_source_runs():
    """The number tables in docs/snippets are rendered from the metrics.json kept beside them."""
    snip = ROOT / "docs" / "snippets"
    src = json.loads((snip / "source_metrics.json").read_text())
    m = src["metrics"]
    headline = (snip / "headline.md").read_text()
    for key, value in m["accuracy"].items():
        if value is not None:
            assert f"{100 * value:.2f} %" in headline, key
    if m["parity"].get("argmax_agreement") is not None:
        assert f"cosine {m['parity']['cosine']:.5f}" in headline
    grid = (snip / "benchmark_grid.md").read_text()
    for row in m["benchmark"]["grid"]:
        assert f"{row['p50']:.2f}" in grid, row
    assert src["run"] in headline and src["run"] in (snip / "run.md").read_text()
