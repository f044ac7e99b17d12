"""Tests of gross.config and the gross command line: resolution, the pipeline, and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import gross
from gross import checkpoint as ckpt
from gross.cli import main
from gross.config import Config, ConfigError, dump_config, parse_override, resolve_config
from gross.model import format_config, parse_config

SRC = Path(__file__).resolve().parents[1] / "src"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


# ---------------------------------------------------------------------------------------------
# Configuration


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = resolve_config()
    assert cfg == Config()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert resolve_config([path]) == cfg


def test_a_number_of_images_stays_a_whole_number():
    assert "val_size: 10000\n" in dump_config(resolve_config(overrides=["data.val_size=10000"]))
    assert resolve_config().data.val_size == 0.2


def test_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, lr: 0.2}\ndecompose: {skip: [conv1]}\n")
    cfg = resolve_config([path], ["train.epochs=3", "decompose.group_sizes=[1, 4, 16]", "model.kwargs={widths: [4, 4, 8, 8]}"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.2
    assert cfg.decompose.skip == ["conv1"] and cfg.decompose.group_sizes == [1, 4, 16]
    assert cfg.model.kwargs == {"widths": [4, 4, 8, 8]}
    assert isinstance(resolve_config(overrides=["train.lr=1"]).train.lr, float)


def test_recipes():
    paper = resolve_config(overrides=["recipe=paper"])
    assert (paper.train.batch_size, paper.train.weight_decay, paper.data.pad) == (128, 0.0, 2)
    assert paper.data.std == [0.225] * 3 and paper.model.kwargs == {"fc_std": 0.1} and paper.data.flip
    authors = resolve_config(overrides=["recipe=authors"])
    assert (authors.train.batch_size, authors.train.lr, authors.train.weight_decay) == (256, 0.1, 1e-3)
    assert authors.data.std == [0.5] * 3 and authors.data.pad == 4
    # The user's settings win over the recipe; model keys apply to the paper network only.
    assert resolve_config(overrides=["recipe=paper", "train.batch_size=32"]).train.batch_size == 32
    assert resolve_config(overrides=["recipe=paper", "model.name=resnet20"]).model.kwargs == {}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", r"unknown key\(s\) train.epoch; train has: epochs"),
        ("trian.epochs=3", r"unknown key\(s\) trian"),
        ("train.epochs=many", "train.epochs: expected an integer, got 'many'"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("data.flip=3", "data.flip: expected true or false"),
        ("recipe=mine", "unknown recipe 'mine'"),
        ("train.epochs", "is not KEY=VALUE"),
        ("train.batch_size=0", "train.batch_size: expected >= 1"),
        ("evaluate.split=test2", "evaluate.split: expected val or test"),
        ("decompose.btd.rtl=1e-3", "decompose.btd: unknown options rtl; known: tol, rtol"),
        ("decompose.btd.max_iter=many", "decompose.btd.max_iter: expected an integer"),
        ("decompose.workers=0", "decompose.workers: expected >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config(overrides=[override])
    assert "\n" not in str(info.value)


def test_btd_options_are_typed():
    # YAML 1.1 reads 5e-3 as a string; gross.btd needs the number.
    assert resolve_config(overrides=["decompose.btd.rtol=5e-3"]).decompose.btd["rtol"] == 0.005


def test_parse_override_parses_yaml_values():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=x=y") == {"a": "x=y"}


def test_paper_experiment_file_resolves():
    cfg = resolve_config([EXPERIMENTS / "paper-cifar10.yaml"])
    assert cfg.recipe == "authors" and cfg.train.epochs == 100 and cfg.train.batch_size == 256
    assert cfg.reconstruct.epochs == 30 and cfg.reconstruct.lr == 1e-4
    assert cfg.finetune.epochs == 150 and cfg.finetune.milestones == [80, 120] and cfg.finetune.alpha == 4
    assert cfg.decompose.skip == ["conv1"] and cfg.data.val_size == 10000
    paper = resolve_config([EXPERIMENTS / "paper-cifar10.yaml"], ["recipe=paper"])
    assert paper.train.batch_size == 128 and paper.data.pad == 2


def test_one_configuration_format_both_ways():
    assert parse_config("2,32,64") == parse_config("2-32-64") == parse_config(format_config((2, 32, 64))) == (2, 32, 64)
    assert format_config((2, 32, 64)) == "2-32-64"
    assert parse_config("conv2=2, conv3=4") == {"conv2": 2, "conv3": 4}
    with pytest.raises(ValueError, match="expected group sizes like 2-32-64, 2,32,64 or conv2=2,conv3=32"):
        parse_config("two")


# ---------------------------------------------------------------------------------------------
# The pipeline


def error_line(err: str) -> str:
    """The error of a failed command: its last stderr line, the only one that says error, no traceback."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("gross: error: "), err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def write_data(path: Path, n: int = 200, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = rng.integers(0, 150, size=(n, size, size, 3), dtype=np.uint8) + (y * 30).astype(np.uint8)[:, None, None, None]
    np.savez(path, x=x.astype(np.uint8), y=y)
    return path


def tiny_args(tmp: Path, name: str = "t") -> list[str]:
    data = tmp / "data.npz"
    if not data.exists():
        write_data(data)
    return [
        "-q", "--device", "cpu", "--runs", str(tmp / "runs"), "--name", name,
        "--set", f"data.dataset={data}",
        "--set", "model.kwargs={widths: [4, 4, 8, 8]}",
        "--set", "train.epochs=2", "--set", "train.batch_size=32",
        "--set", "decompose.btd={max_iter: 10}",
        "--set", "reconstruct.epochs=1", "--set", "reconstruct.batch_size=32",
        "--set", "finetune.epochs=1", "--set", "finetune.batch_size=32",
        "--set", "evaluate.samples=3",
    ]


def test_run_writes_every_stage_and_prints_the_table(tmp_path, capsys):
    assert main(["run", *tiny_args(tmp_path), "--set", "export.onnx=false"]) == 0
    out, err = capsys.readouterr()
    run = tmp_path / "runs" / "t"
    for stage in ("base", "decompose", "reconstruct", "gross"):
        assert (run / stage / "model.safetensors").is_file() and (run / stage / "arch.json").is_file()
        assert not (run / stage / "checkpoint.safetensors").exists()
    assert (run / "base" / "metrics.jsonl").is_file() and (run / "gross" / "metrics.jsonl").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["model"]["kwargs"] == {"widths": [4, 4, 8, 8]}
    lines = out.strip().splitlines()
    assert lines[1].split()[:2] == ["configuration", "val"]
    assert any("uniform 4" in line for line in lines) and any(line.startswith("original ") for line in lines)
    assert sum("chosen" in line for line in lines) == 1 and any("pareto" in line for line in lines)
    best = json.loads((run / "search" / "best.json").read_text())
    assert best["finished"] and (run / "search" / "results.csv").is_file()
    fused = f"; fused into one dense conv: {', '.join(best['best']['dense'])}" if best["best"]["dense"] else ""
    assert f"exported {best['best_config']} (the search's best{fused}) -> {run / 'export'}" in out
    assert (run / "export" / "net.safetensors").is_file() and (run / "export" / "net.json").is_file()
    assert (run / "report.md").is_file() and (run / "pareto.png").is_file() and f"report: {run / 'report.md'}" in out
    assert not (run / "evaluate").exists()
    model, meta = ckpt.load_model(run / "gross" / "model.safetensors")
    assert [s["name"] for s in meta["arch"]["layers"]] == ["conv2", "conv3", "conv4"]
    # The decomposition records every fit's conditioning.
    decomposed, decomposed_meta = ckpt.load_model(run / "decompose" / "model.safetensors")
    kappa = {f"{n}/{s}": gross.conditioning(layer.decomposition(s)) for n, layer in gross.gross_layers(decomposed) for s in layer.group_sizes}
    assert decomposed_meta["kappa"] == pytest.approx(kappa, rel=1e-3)
    # A second run finds every stage done and prints the same.
    before = (run / "gross" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", *tiny_args(tmp_path)]) == 0
    out2, err2 = capsys.readouterr()
    assert err2.count("done already") == 7 and out2 == out
    assert (run / "gross" / "model.safetensors").stat().st_mtime_ns == before
    # Reusing a finished stage made with other settings warns, and keeps it.
    assert main(["run", *tiny_args(tmp_path), "--set", "finetune.alpha=0"]) == 0
    err3 = capsys.readouterr().err
    assert "warning:" in err3 and "gross/model.safetensors was made with other finetune settings" in err3
    assert (run / "gross" / "model.safetensors").stat().st_mtime_ns == before

    # gross evaluate at given configurations and on the test split.
    assert main(["evaluate", *tiny_args(tmp_path), "--config", "2,4,8", "--config", "conv3=1", "--split", "test",
                 "--out", str(tmp_path / "rows.csv")]) == 0
    out, _ = capsys.readouterr()
    assert "2-4-8" in out and "4-1-8" in out and "test acc %" in out
    assert (tmp_path / "rows.csv").read_text().count("\n") == 3
    # gross fixed trains one configuration on its own.
    assert main(["fixed", *tiny_args(tmp_path), "--config", "2,4,8"]) == 0
    out, _ = capsys.readouterr()
    fixed = run / "fixed" / "2-4-8" / "gross" / "model.safetensors"
    assert fixed.is_file() and "2-4-8" in out
    model, _ = ckpt.load_model(fixed)
    assert [m.group_sizes for n, m in model.named_modules() if hasattr(m, "group_sizes")] == [(2,), (4,), (8,)]


def test_single_stage_commands_and_refusals(tmp_path, capsys):
    args = tiny_args(tmp_path)
    assert main(["decompose", *args]) == 1
    assert "base/model.safetensors is missing; run `gross train --name t`" in capsys.readouterr().err
    assert main(["train", *args]) == 0
    base = tmp_path / "runs" / "t" / "base" / "model.safetensors"
    saved = base.read_bytes()
    capsys.readouterr()
    # A finished stage is not redone without --force.
    assert main(["train", *args]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    # A diverging loss stops with one line, and the earlier result stays.
    assert main(["train", *args, "--force", "--set", "train.lr=1e30"]) == 1
    assert error_line(capsys.readouterr().err).startswith("gross: error: train: the loss became nan")
    assert base.read_bytes() == saved
    # A base network of another architecture is refused when the next stage loads it.
    assert main(["decompose", *args, "--set", "model.kwargs={widths: [8, 8, 8, 8]}"]) == 1
    err = error_line(capsys.readouterr().err)
    assert "holds paper(" in err and "but this run's model is paper(" in err
    assert main(["decompose", *args]) == 0
    assert main(["reconstruct", *args]) == 0
    assert main(["finetune", *args]) == 0


def test_data_errors_are_one_line(tmp_path, capsys):
    args = tiny_args(tmp_path)
    assert main(["train", *args, "--set", f"data.dataset={tmp_path / 'missing.npz'}"]) == 1
    assert "missing.npz" in error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    assert main(["train", *args, "--set", f"data.dataset={bad}"]) == 1
    assert "bad.npz" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "t" / "base").exists()


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    args = tiny_args(tmp_path)
    base = tmp_path / "runs" / "t" / "base"
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"\x00" * 20)
    assert main(["decompose", *args]) == 1
    err = error_line(capsys.readouterr().err)
    assert "is corrupt" in err and "delete it and rerun" in err


def test_errors_in_a_real_process_exit_nonzero_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "gross.cli", "train", "-q", "--runs", str(tmp_path), "--set", f"data.dataset={tmp_path / 'nope.npz'}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("gross: error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_redirected_output_gets_messages_but_no_progress_bars(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
    args = [a for a in tiny_args(tmp_path) if a != "-q"]
    proc = subprocess.run([sys.executable, "-m", "gross.cli", "train", *args, "--set", "train.epochs=1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[train]" in proc.stderr and ": paper on " in proc.stderr and ", 1 epoch\n" in proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr


def test_help_documents_the_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--set" in out and "train.epochs=3" in out and "--resume" in out
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert "--strategy" in out and "--max-ms" in out and "exhaustive when at most" in out
