"""The pipeline as a library: gross.pipeline.run and the stage functions, without the CLI."""

from __future__ import annotations

import json

from gross import pipeline
from gross.config import resolve_config

from test_cli import tiny_args


def tiny_config(tmp_path):
    args = tiny_args(tmp_path)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return resolve_config(overrides=[*overrides, f"runs={tmp_path / 'runs'}", "name=lib", "device=cpu", "export.onnx=false"])


def test_run_returns_what_it_made(tmp_path):
    cfg = tiny_config(tmp_path)
    result = pipeline.run(cfg)
    best = json.loads((cfg.run_dir / "search" / "best.json").read_text())
    assert result.run_dir == cfg.run_dir and result.report == cfg.run_dir / "report.md" and result.report.is_file()
    assert result.export["config"] == best["best"]["config"] and (cfg.run_dir / "export" / "net.safetensors").is_file()
    # One stage again, on a context: the search finds itself done.
    ctx = pipeline.context(cfg)
    assert pipeline.stage_search(ctx, skip_done=True) is False
    rows, labels, _ = pipeline.search_results(ctx)
    assert len(rows) >= len(labels) >= 3
