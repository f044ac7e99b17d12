"""The search, latency, export and report subcommands on a tiny finetuned run."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from gross import checkpoint as ckpt
from gross.cli import main
from gross.export import load as load_export
from gross.model import set_config

from test_cli import error_line, tiny_args

ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run folder finetuned to gross/ (widths 4, 4, 8, 8: 3 x 3 x 4 = 36 configurations)."""
    root = tmp_path_factory.mktemp("trained")
    for stage in ("train", "decompose", "reconstruct", "finetune"):
        assert main([stage, *tiny_args(root)]) == 0
    return root


@pytest.fixture
def run(trained, tmp_path) -> tuple[list[str], Path]:
    """A private copy of the trained run: its command-line arguments and its folder."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tiny_args(tmp_path), tmp_path / "runs" / "t"


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_search_export_report_write_their_files(run, capsys):
    args, folder = run
    assert main(["search", *args, "--test"]) == 0
    out, err = capsys.readouterr()
    search = folder / "search"
    results = rows(search / "results.csv")
    best = json.loads((search / "best.json").read_text())
    assert best["finished"] and best["strategy"] == "exhaustive" and best["evaluations"] == len(results) == 36
    assert "exhaustive search" in err and "(36 scored now)" in err
    # Chosen on val: the best val accuracy (ties: fewer MACs); test accuracy is only reported.
    top = max(results, key=lambda r: (float(r["val_accuracy"]), -float(r["cost"])))
    assert best["best"]["config"] == [int(s) for s in top["config"].split("-")]
    assert all(r["test_accuracy"] for r in results)
    uniform = {r["label"]: r for r in rows(search / "uniform.csv")}
    assert list(uniform) == ["uniform 1", "uniform 2", "uniform 4", "uniform 8"] and uniform["uniform 8"]["config"] == "4-4-8"
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["configuration", "val", "acc", "%"] and "test acc %" in lines[1]
    chosen = [line for line in lines if "chosen" in line]
    assert len(chosen) == 1 and chosen[0].startswith(best["best_config"])
    assert any("uniform 4" in line for line in lines) and any("pareto" in line for line in lines)

    assert main(["export", *args, "--best"]) == 0
    out, _ = capsys.readouterr()
    export = folder / "export"
    summary = json.loads((export / "summary.json").read_text())
    assert summary["config"] == best["best"]["config"] and summary["source"] == "search"
    # The layers the search counted as one dense conv (cheaper than their bottleneck) are fused.
    assert summary["fused"] == best["best"]["dense"] and summary["fuse"] == ("search" if summary["fused"] else "none")
    assert (export / "net.safetensors").is_file() and (export / "net.json").is_file()
    assert "MACs (M)" in out and "latency (ms, end to end, torch, batch 1, 1 thread, cpu)" in out and str(export) in out
    # The test accuracy of the chosen network is shown (never used to choose).
    assert set(summary["test_accuracy"]) == {"original", "exported"} and "test acc %" in out
    if ONNX:
        assert (export / "net.onnx").is_file() and "net.onnx" in summary["files"]
        if importlib.util.find_spec("onnxruntime"):
            assert summary["onnx"]["checked"] and summary["onnx"]["max_abs_diff"] < 1e-4
    else:
        assert not (export / "net.onnx").exists() and "net.onnx skipped" in out
    # The exported files rebuild a plain network with the GroSS network's outputs at that configuration.
    plain = load_export(export)
    model, _ = ckpt.load_model(folder / "gross" / "model.safetensors")
    set_config(model, best["best"]["config"])
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5, rtol=1e-4)
    assert not any(hasattr(m, "group_sizes") for m in plain.modules())
    assert summary["macs"]["exported"] < summary["macs"]["original"]
    # Beside it, a program that torch alone reloads, with the same outputs; net.json says where the architecture comes from.
    assert summary["pt2"]["checked"] and "net.pt2" in summary["files"] and "net.pt2 checked" in out
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(export / "net.pt2").module()(x), model(x))
    assert summary["arch"] == {"name": "paper", "kwargs": json.loads((export / "net.json").read_text())["arch"]["kwargs"], "source": "built-in"}

    assert main(["report", *args]) == 0
    capsys.readouterr()
    report = (folder / "report.md").read_text()
    assert (folder / "pareto.png").is_file() and (folder / "front_group_sizes.png").is_file()
    assert "uniform:4 (<=" in report and "uniform:16 (<=" in report and "uniform 8" in report
    fused = f", fused: {', '.join(summary['fused'])}" if summary["fused"] else ""
    assert "## Measured networks" in report and f"| chosen by MACs{fused} | {' '.join(map(str, summary['config']))} |" in report
    if summary["fused"]:  # which layers stayed dense, and why
        assert f"keeps {', '.join(summary['fused'])} dense: one conv per layer" in report and "dense layers" in report


def test_search_resumes_from_its_files(run, capsys):
    args, folder = run
    search = folder / "search"
    assert main(["search", *args]) == 0
    first = (search / "results.csv").read_text()
    best = json.loads((search / "best.json").read_text())["best"]
    capsys.readouterr()
    # An interrupted search: no best.json, results.csv cut in the middle of a row.
    (search / "best.json").unlink()
    lines = first.splitlines(keepends=True)
    (search / "results.csv").write_text("".join(lines[:11]) + lines[11][:9])
    assert main(["search", *args]) == 0
    err = capsys.readouterr().err
    assert "(26 scored now)" in err  # 10 rows kept; the cut one is scored again
    assert json.loads((search / "best.json").read_text())["best"] == best
    assert sorted((search / "results.csv").read_text().splitlines()) == sorted(first.splitlines())
    # Another budget or strategy takes every score already there.
    assert main(["search", *args, "--budget", "uniform:2", "--strategy", "beam"]) == 0
    out, err = capsys.readouterr()
    assert "beam over 36 configurations" in err and "(0 scored now)" in err and "chosen (beam, budget uniform:2)" in out
    # Whatever the strategy, nothing scored that fits the budget beats the choice.
    best = json.loads((search / "best.json").read_text())
    for row in rows(search / "results.csv") + rows(search / "uniform.csv"):
        if float(row["cost"]) <= best["limit"]:
            assert float(row["val_accuracy"]) <= best["best"]["val_accuracy"], row
    # Scores of another validation split are not reused silently.
    assert main(["search", *args, "--set", "data.split_seed=1"]) == 1
    assert "holds the search of another GroSS model, validation split or BatchNorm recalibration; pass --force" in error_line(capsys.readouterr().err)
    assert main(["search", *args, "--set", "data.split_seed=1", "--force"]) == 0
    assert "(36 scored now)" in capsys.readouterr().err
    # Nor scores made with other BatchNorm statistics (the paper network has none: same scores).
    assert main(["search", *args, "--set", "data.split_seed=1", "--set", "search.recalibrate=12"]) == 1
    assert "BatchNorm recalibration; pass --force" in error_line(capsys.readouterr().err)
    before = rows(search / "results.csv")
    assert main(["search", *args, "--set", "data.split_seed=1", "--set", "search.recalibrate=12", "--force"]) == 0
    assert "(36 scored now)" in capsys.readouterr().err
    assert sorted(r["val_accuracy"] for r in rows(search / "results.csv")) == sorted(r["val_accuracy"] for r in before)


def test_latency_table_and_search_under_it(run, capsys):
    args, folder = run
    code = main(["latency", *args, "--batch-size", "2", "--repeats", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    table = json.loads((folder / "latency" / "table.json").read_text())
    assert table["meta"]["batch_size"] == 2 and [layer["name"] for layer in table["layers"]] == ["conv2", "conv3", "conv4"]
    assert "dense" in out.splitlines()[1] and "rest" in out
    # One step: the search by latency, with the dense conv as a per-layer choice, exported fused where faster.
    best = json.loads((folder / "latency" / "search" / "best.json").read_text())
    summary = json.loads((folder / "latency" / "export" / "summary.json").read_text())
    assert best["cost"] == "latency_ms_fused" and summary["config"] == best["best"]["config"] and summary["fuse"] == "auto"
    options = [layer["ms"] for layer in table["layers"]]
    faster_dense = [layer["name"] for layer, o, size in zip(table["layers"], options, summary["config"]) if o["dense"] < o[str(size)]]
    assert summary["fused"] == faster_dense and set(summary["fuse_times"]) == {"conv2", "conv3", "conv4"}
    # Default budget: the original's predicted latency, which every configuration meets once fused.
    assert best["limit"] == pytest.approx(table["rest_ms"] + sum(o["dense"] for o in options))
    assert "at group size" in out and "dense conv" in out  # why each layer was fused or kept
    assert "original" in out and "chosen by latency" in out and "measured ms" in out
    # Again at the same batch size: the table is reused, the search takes its scores, the export is replaced.
    code = main(["latency", *args, "--batch-size", "2", "--max-ms", str(best["limit"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[latency] using" in err and "(0 scored now)" in err
    # Searching by it for another batch size (the configured 1) is refused; at batch 2 it is used.
    assert main(["search", *args, "--latency"]) == 1
    assert "latency/table.json does not fit search.cost: latency: it was measured with torch, batch 2, 1 thread, cpu, " \
           "not torch, batch 1, 1 thread, cpu" in error_line(capsys.readouterr().err)
    args += ["--set", "latency.batch_size=2"]
    assert main(["search", *args, "--latency", "--budget", "none", "--strategy", "evolution", "--max-evaluations", "6", "--seed", "3"]) == 0
    out, _ = capsys.readouterr()
    best = json.loads((folder / "search" / "best.json").read_text())
    assert best["cost"] == "latency_ms_fused" and best["evaluations"] == 6 and best["options"]["seed"] == 3
    assert "pred. ms" in out and "with layers fused where the dense conv is faster" in out
    # fuse=all: every layer one dense conv, still the GroSS outputs.
    assert main(["export", *args, "--config", "conv3=2", "--fuse", "all", "--no-onnx"]) == 0
    capsys.readouterr()
    summary = json.loads((folder / "export" / "summary.json").read_text())
    assert summary["config"] == [4, 2, 8] and summary["fused"] == ["conv2", "conv3", "conv4"] and summary["source"] == "given"
    assert not (folder / "export" / "net.onnx").exists() and summary["max_abs_diff_vs_gross"] < 1e-4


def test_bad_input_is_one_line(run, capsys, tmp_path):
    args, folder = run

    def fails(*command: str) -> str:
        assert main([*command, *args]) == 1
        return error_line(capsys.readouterr().err)

    assert "search/best.json is missing; run `gross search --name t` first or pass --config" in fails("export", "--best")
    assert "search/results.csv is missing; run `gross search --name t`" in fails("report")
    assert "latency/table.json is missing; run `gross latency` first" in fails("search", "--latency")
    assert "group size 3 is not valid for conv2; choose from [1, 2, 4]" in fails("export", "--config", "3,4,8")
    assert "has 2 sizes; the network has 3 GroSS layers (conv2, conv3, conv4)" in fails("export", "--config", "2,4")
    assert "names conv9, which are not GroSS layers" in fails("export", "--config", "conv9=2")
    assert "not a configuration: 'two' (expected group sizes like 2-32-64" in fails("export", "--config", "two")
    assert "unknown budget 'lots'" in fails("search", "--budget", "lots")
    assert "below the cheapest configuration" in fails("search", "--max-macs", "10")
    assert "search.strategy: expected one of" in fails("search", "--set", "search.strategy=greedy")
    assert not (folder / "export").exists()
    assert main(["export", *args, "--config", "1,1,1", "--no-onnx"]) == 0
    capsys.readouterr()
    assert "export exists; pass --force to replace it" in fails("export", "--config", "2,2,2")
    assert "group size 3 is not valid for conv2" in fails("export", "--config", "3,3,3")  # checked before "exists"
    # A run that has not been finetuned yet.
    other = tiny_args(tmp_path, name="fresh")
    assert main(["search", *other]) == 1
    assert "gross/model.safetensors is missing; run `gross finetune --name fresh`" in error_line(capsys.readouterr().err)


def test_missing_onnx_extras_are_skipped_with_a_message(run, capsys, monkeypatch):
    import gross.pipeline

    args, folder = run
    installed = gross.pipeline._installed
    monkeypatch.setattr(gross.pipeline, "_installed", lambda m: m != "onnxscript" and installed(m))
    assert main(["export", *args, "--config", "1,2,4"]) == 0
    out, _ = capsys.readouterr()
    assert "net.onnx skipped: onnxscript not installed (pip install 'gross[export]')" in out
    assert not (folder / "export" / "net.onnx").exists() and (folder / "export" / "net.json").is_file()
    if ONNX:
        monkeypatch.setattr(gross.pipeline, "_installed", lambda m: m != "onnxruntime" and installed(m))
        assert main(["export", *args, "--config", "1,2,4", "--force"]) == 0
        out, _ = capsys.readouterr()
        assert (folder / "export" / "net.onnx").is_file() and "net.onnx not checked: onnxruntime not installed" in out
    # gross run finishes without ONNX, the report included, saying in one line which extra adds it.
    monkeypatch.setattr(gross.pipeline, "_installed", lambda m: m not in ("onnx", "onnxscript") and installed(m))
    shutil.rmtree(folder / "export")
    assert main(["run", *args]) == 0
    out, _ = capsys.readouterr()
    assert (folder / "report.md").is_file() and f"report: {folder / 'report.md'}" in out
    assert "net.onnx skipped: onnx and onnxscript not installed (pip install 'gross[export]')" in out
    assert not (folder / "export" / "net.onnx").exists()


@pytest.mark.skipif(not (ONNX and importlib.util.find_spec("onnxruntime")), reason="needs gross[export]")
def test_latency_on_onnxruntime_is_recorded_and_never_reused_elsewhere(run, capsys):
    args, folder = run
    assert main(["search", *args]) == 0 and main(["export", *args, "--no-onnx"]) == 0  # the choice by MACs, timed with torch
    capsys.readouterr()
    code = main(["latency", *args, "--runtime", "onnxruntime", "--batch-size", "2", "--repeats", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    setup = "onnxruntime, batch 2, 1 thread, cpu"
    table = json.loads((folder / "latency" / "table.json").read_text())
    assert {k: table["meta"][k] for k in ("runtime", "batch_size", "threads", "device")} == {
        "runtime": "onnxruntime", "batch_size": 2, "threads": 1, "device": "cpu"}
    assert f"each as its own ONNX graph, with {setup}" in err and f"ms per layer and group size with {setup}" in out
    assert f"measured with {setup}" in err  # the search's budget names where it was measured
    source = json.loads((folder / "latency" / "search" / "source.json").read_text())
    assert source["latency_setup"] == {"runtime": "onnxruntime", "batch_size": 2, "threads": 1, "device": "cpu"}
    # The choice is measured end to end on the same runtime and batch, beside MACs and parameters.
    summary = json.loads((folder / "latency" / "export" / "summary.json").read_text())
    assert summary["latency_setup"] == {"runtime": "onnxruntime", "batch_size": 2, "threads": 1, "device": "cpu", "repeats": 2}
    assert {"original", "exported"} <= set(summary["latency_ms"])  # values are timings: never asserted
    assert f"latency (ms, end to end, {setup})" in out and "params (k)" in out
    # report.md: each network with where it was measured; the original once per setup.
    report = (folder / "report.md").read_text()
    assert "| measured with |" in report and f"| {setup} |" in report and "| torch, batch 1, 1 thread, cpu |" in report
    assert report.count("| original | - |") == 2
    # Another runtime or batch size never uses the table silently: refused, or measured again.
    assert main(["export", *args, "--config", "1,1,1", "--fuse", "auto", "--no-onnx", "--force"]) == 1
    assert (f"latency/table.json does not fit export.fuse: auto: it was measured with {setup}, not torch, batch 1, 1 thread, cpu"
            in error_line(capsys.readouterr().err))
    assert main(["latency", *args, "--batch-size", "2", "--repeats", "2"]) == 0
    err = capsys.readouterr().err
    assert f"it was measured with {setup}, not torch, batch 2, 1 thread, cpu; measuring it again" in err
    assert json.loads((folder / "latency" / "table.json").read_text())["meta"]["runtime"] == "torch"


def test_onnxruntime_missing_is_one_line_and_the_rest_works(run, capsys, monkeypatch):
    args, folder = run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    for command in (["latency", "--runtime", "onnxruntime"], ["export", "--config", "1,2,4", "--runtime", "onnxruntime"]):
        assert main([*command, *args]) == 1
        assert ("the onnxruntime runtime needs onnxruntime, onnx, onnxscript and onnxruntime is not installed: "
                "pip install 'gross[export]'") in error_line(capsys.readouterr().err)
    assert not (folder / "latency").exists() and not (folder / "export").exists()
    assert main(["latency", *args, "--repeats", "2"]) == 0  # torch needs nothing more
    assert "net.onnx not checked: onnxruntime not installed" in capsys.readouterr().out


def test_latency_with_a_relative_runs_folder(run, capsys, monkeypatch):
    # As the README runs it: `gross latency` with the default runs folder, relative to the working directory.
    args, folder = run
    monkeypatch.chdir(folder.parent.parent)
    args = ["runs" if a == str(folder.parent) else a for a in args]
    assert "runs" in args
    assert main(["latency", *args, "--repeats", "2"]) == 0, capsys.readouterr().err
    summary = json.loads((folder / "latency" / "export" / "summary.json").read_text())
    assert summary["fuse"] == "auto"
