"""The pipeline as a library: gross.pipeline.run and the stage functions, without the CLI."""

from __future__ import annotations

import json

from gross import pipeline
from gross.config import resolve_config

from test_cli import tiny_args


def pipeline_overrides(tmp_path) -> list[str]:
    args = tiny_args(tmp_path)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return [*overrides, f"runs={tmp_path / 'runs'}", "name=lib", "device=cpu", "export.onnx=false"]


def tiny_config(tmp_path):
    return resolve_config(overrides=pipeline_overrides(tmp_path))


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


def test_a_slower_export_is_said_plainly_in_the_report(tmp_path):
    cfg = tiny_config(tmp_path)
    pipeline.run(cfg)
    ctx = pipeline.context(cfg)
    path = cfg.run_dir / "export" / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["macs"]["exported"] < summary["macs"]["original"]
    summary["latency_ms"] = {"original": 1.0, "exported": 2.0}
    path.write_text(json.dumps(summary))
    note = pipeline.slower_note(ctx, summary)
    assert note.startswith(f"The exported network {'-'.join(map(str, summary['config']))} is 2.00x slower than the original with torch, batch 1, 1 thread, cpu, although it has ")
    assert "`gross latency --name lib` chooses by measured latency instead" in note
    report = pipeline.stage_report(ctx).read_text()
    assert note in report and "| chosen by MACs" in report and "2.00x slower (timed together) |" in report
    summary["latency_ms"] = {"original": 2.0, "exported": 1.0}
    assert pipeline.slower_note(ctx, summary) is None


def test_a_setting_added_since_a_stage_ran_does_not_count_as_changed_at_its_default():
    saved, default = {"epochs": 3, "fixed": {"lr": 0.1}}, {"epochs": 1, "new": False, "fixed": {"lr": 0.1, "new": 0}}
    assert not pipeline._differs(saved, {"epochs": 3, "new": False, "fixed": {"lr": 0.1, "new": 0}}, default)
    assert pipeline._differs(saved, {"epochs": 3, "new": True, "fixed": {"lr": 0.1, "new": 0}}, default)
    assert pipeline._differs(saved, {"epochs": 3, "new": False, "fixed": {"lr": 0.1, "new": 2}}, default)
    assert pipeline._differs(saved, {"epochs": 4, "new": False, "fixed": {"lr": 0.1, "new": 0}}, default)


def test_finetune_distils_from_the_base_network_and_trains_the_sandwich(tmp_path, capsys):
    cfg = resolve_config(overrides=[*pipeline_overrides(tmp_path), "finetune.distill=0.5", "finetune.temperature=2", "finetune.sandwich=true"])
    ctx = pipeline.context(cfg)
    for stage in (pipeline.stage_train, pipeline.stage_decompose, pipeline.stage_reconstruct, pipeline.stage_finetune):
        stage(ctx)
    assert "distilled from the original (weight 0.5, T 2), sandwich (largest and smallest configuration every step)" in capsys.readouterr().err
    saved = json.loads((cfg.run_dir / "gross" / "arch.json").read_text())["config"]["finetune"]
    assert saved["distill"] == 0.5 and saved["sandwich"] is True
