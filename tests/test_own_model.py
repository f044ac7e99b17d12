"""A user's own network: named by file or import path, its weights adopted, every stage run on it.

The network (tests/user_model/mynet.py) has what users' networks have and gross's built-in ones
do not: BatchNorm, a residual block imported from a file beside it, a strided conv, a dilated
bias-free conv, a depthwise conv, a 1x1 conv and odd widths (24, 48, 96).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gross
from gross import pipeline
from gross.cli import main
from gross.config import ConfigError, resolve_config
from gross.models import build_model, canonical_name, load_weights, read_state_dict, resolve_model

from test_cli import error_line, write_data

MYNET = Path(__file__).resolve().parent / "user_model" / "mynet.py"
REFERENCE = f"{MYNET}:MyNet"


def my_net(seed: int = 0, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(REFERENCE, num_classes=num_classes)
    # Non-trivial BatchNorm statistics, as a trained network has.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def own_settings(tmp_path: Path, name: str = "own") -> list[str]:
    data = tmp_path / "data.npz"
    if not data.exists():
        write_data(data, n=120, size=12)
    return [
        f"runs={tmp_path / 'runs'}", f"name={name}", "device=cpu", f"data.dataset={data}",
        "decompose.btd={max_iter: 5}", "reconstruct.epochs=1", "reconstruct.batch_size=32",
        "finetune.epochs=1", "finetune.batch_size=32", "evaluate.samples=2", "latency.repeats=3",
    ]  # fmt: skip


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Naming a network


def test_a_model_is_named_by_builtin_name_import_path_or_file(tmp_path, monkeypatch):
    assert resolve_model("paper") is gross.models.PaperNet
    assert resolve_model("gross.models:resnet20") is gross.models.resnet20
    cls = resolve_model(REFERENCE)
    assert cls.__name__ == "MyNet" and resolve_model(REFERENCE) is cls  # the same file, the same class
    # A relative path starts from the current folder; the canonical name is absolute.
    monkeypatch.chdir(MYNET.parent.parent)
    assert resolve_model("user_model/mynet.py:MyNet") is cls
    assert canonical_name("user_model/mynet.py:MyNet") == REFERENCE
    assert canonical_name("paper") == "paper" and canonical_name("a.b:C") == "a.b:C"
    # A factory function and a dotted attribute both work.
    assert type(build_model(f"{MYNET}:build", width=8)).__name__ == "MyNet"
    assert build_model(f"{MYNET}:MyNet", width=8).stem.out_channels == 8
    assert "blocks" not in sys.modules or sys.modules["blocks"].__file__.startswith(str(MYNET.parent))


@pytest.mark.parametrize(
    "name, message",
    [
        ("nonet", r"unknown model 'nonet'; give a built-in name \(paper, resnet18, .*\), package.module:callable, or path/to/file.py:callable"),
        ("no_such_module_xyz:Net", r"cannot import 'no_such_module_xyz' for model"),
        ("gross.models:Nope", r"gross.models has no attribute 'Nope'"),
        ("gross.models:__all__", r"__all__ is a list, not a class or function"),
        ("missing/file.py:Net", r"model file .*missing/file.py does not exist"),
    ],
)
def test_a_bad_model_name_says_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message):
        build_model(name)


def test_a_file_that_fails_to_import_is_one_error(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\nraise RuntimeError('the user bug')\n")
    with pytest.raises(ValueError, match=r"importing .*broken.py failed: RuntimeError: the user bug"):
        resolve_model(f"{tmp_path / 'broken.py'}:Net")
    (tmp_path / "notnet.py").write_text("def make():\n    return 3\n")
    with pytest.raises(ValueError, match="returned a int, not an nn.Module"):
        build_model(f"{tmp_path / 'notnet.py'}:make")


# ---------------------------------------------------------------------------------------------
# Reading the user's weights


def test_weights_load_from_nested_prefixed_pt_and_safetensors(tmp_path):
    source = my_net(seed=1).state_dict()
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}, "state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "a.pt")
    torch.save({"model": source}, tmp_path / "b.pth")
    torch.save({"model_state_dict": {f"_orig_mod.{k}": v for k, v in source.items()}}, tmp_path / "c.bin")
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "d.safetensors"))
    for name in ("a.pt", "b.pth", "c.bin", "d.safetensors"):
        model = load_weights(my_net(seed=2), tmp_path / name)
        assert state_equal(model.state_dict(), source), name


def test_weights_that_do_not_fit_say_which_keys(tmp_path):
    state = my_net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    state["stem.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError) as info:
        load_weights(my_net(), tmp_path / "w.pt")
    text = str(info.value)
    assert "\n" not in text and "does not fit MyNet" in text
    assert "1 missing (head.bias)" in text and "1 unexpected (extra.weight)" in text
    assert "1 of another shape (file vs model: stem.weight (5, 3, 3, 3) vs (24, 3, 3, 3))" in text


class Payload:
    """An object whose unpickling would run code: weights_only refuses it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_pickle_with_code_is_refused_with_one_line(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": my_net().state_dict(), "hook": Payload()}, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    assert "cannot be read as weights only" in str(info.value) and "\n" not in str(info.value)
    with open(tmp_path / "module.pt", "wb") as f:
        pickle.dump(Payload(), f, protocol=2)
    with pytest.raises(ValueError, match="cannot be read as weights only"):
        read_state_dict(tmp_path / "module.pt")
    assert "unpickled!" not in capsys.readouterr().out


def test_files_that_hold_no_weights_are_refused(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a weights file; expected one of .safetensors, .pt, .pth, .bin"):
        read_state_dict(tmp_path / "w.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")


# ---------------------------------------------------------------------------------------------
# Every stage on the user's network


def test_the_cli_runs_every_stage_on_a_network_given_by_file_and_weights(tmp_path, capsys):
    original = my_net(seed=3)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, tmp_path / "mynet.pt")
    settings = own_settings(tmp_path) + [f"model.name={REFERENCE}", f"model.weights={tmp_path / 'mynet.pt'}"]
    argv = ["run", "-q", *[a for s in settings for a in ("--set", s)]]
    assert main(argv) == 0
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "own"
    # The base is the given network, bit for bit, with what a trained base records.
    assert state_equal(load_file(str(run / "base" / "model.safetensors")), original.state_dict())
    meta = json.loads((run / "base" / "arch.json").read_text())
    assert meta["adopted"] == str(tmp_path / "mynet.pt") and meta["arch"]["model"] == REFERENCE
    assert {"val_acc", "test_acc", "macs"} <= set(meta["final"]) and meta["final"]["macs"] == gross.count_macs(original, (3, 12, 12)).total
    # Every conv is decomposed or left dense with its reason.
    for line in ("[decompose] stem: left dense (group sizes [1]: nothing to choose)", "[decompose] block.conv1: group sizes [1, 2, 4, 8, 24]",
                 "[decompose] down: group sizes [1, 2, 4, 8, 24]", "[decompose] dw: left dense (depthwise conv)",
                 "[decompose] pw: left dense (1x1 kernel"):
        assert line in err, line
    decomposed = json.loads((run / "gross" / "arch.json").read_text())["arch"]["layers"]
    assert [layer["name"] for layer in decomposed] == ["block.conv1", "block.conv2", "down"]
    assert (run / "export" / "summary.json").is_file() and (run / "report.md").is_file()
    # Running again continues from the same base; other weights are refused with one line.
    assert main(argv) == 0
    capsys.readouterr()
    torch.save(my_net(seed=4).state_dict(), tmp_path / "other.pt")
    assert main([*argv, "--set", f"model.weights={tmp_path / 'other.pt'}"]) == 1
    assert "holds other weights than" in error_line(capsys.readouterr().err)


def test_the_python_entry_runs_every_stage_on_a_module(tmp_path):
    model = my_net(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = resolve_config(overrides=own_settings(tmp_path, "py"))
    result = pipeline.run(cfg, model=model)
    assert state_equal(model.state_dict(), before)  # the user's module is not touched
    assert state_equal(load_file(str(result.run_dir / "base" / "model.safetensors")), before)
    meta = json.loads((result.run_dir / "base" / "arch.json").read_text())
    assert meta["adopted"] == "the module given in Python" and meta["arch"]["model"].startswith("python:")
    assert meta["arch"]["model"].endswith(".MyNet") and result.report.is_file()
    # The same module continues the run; another one is a clear error, and so is none.
    pipeline.run(cfg, model=model)
    with pytest.raises(pipeline.StageError, match="holds other weights than the module given in Python"):
        pipeline.run(cfg, model=my_net(seed=6))
    ctx = pipeline.context(cfg)
    with pytest.raises(gross.checkpoint.CheckpointError, match=r"was given in Python, so no name rebuilds it; pass the same module again"):
        pipeline.stage_search(ctx)


def test_bad_settings_leave_no_config_behind(tmp_path, capsys):
    settings = own_settings(tmp_path, "bad") + ["model.name=nosuch.module:Net"]
    assert main(["run", "-q", *[a for s in settings for a in ("--set", s)]]) == 1
    assert "model.name: cannot import 'nosuch.module'" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "bad" / "config.yaml").exists()
    settings = own_settings(tmp_path, "bad") + [f"model.name={REFERENCE}", f"model.weights={tmp_path / 'none.pt'}"]
    assert main(["run", "-q", *[a for s in settings for a in ("--set", s)]]) == 1
    assert "model.weights: " in error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "bad" / "config.yaml").exists()


def test_a_bad_saved_setting_names_the_file_it_came_from(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("train: {epochs: many}\n")
    assert main(["run", "-q", "--runs", str(tmp_path / "runs"), "--name", "x"]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(run / "config.yaml") in line and "train.epochs: expected an integer" in line


def test_decompose_only_and_skip_patterns_reach_the_stage(tmp_path, capsys):
    torch.save(my_net().state_dict(), tmp_path / "w.pt")
    settings = own_settings(tmp_path, "only") + [f"model.name={REFERENCE}", f"model.weights={tmp_path / 'w.pt'}",
                                                 "decompose.only=[block.*]", "decompose.skip=[block.conv2]"]
    ctx = pipeline.context(resolve_config(overrides=settings))
    pipeline.stage_train(ctx)
    pipeline.stage_decompose(ctx)
    err = capsys.readouterr().err
    assert "[decompose] down: left dense (not matched by only)" in err and "[decompose] block.conv2: left dense (skipped by skip)" in err
    layers = json.loads((ctx.run_dir / "decompose" / "arch.json").read_text())["arch"]["layers"]
    assert [layer["name"] for layer in layers] == ["block.conv1"]


def test_model_kwargs_are_filled_only_where_the_constructor_takes_them(tmp_path):
    data = write_data(tmp_path / "d.npz", n=40, size=8)
    cfg = resolve_config(overrides=[f"data.dataset={data}", f"model.name={MYNET}:build", "device=cpu", f"runs={tmp_path}"])
    arch = pipeline.base_arch(pipeline.context(cfg))
    assert arch["kwargs"] == {"num_classes": 4}  # build() takes num_classes, not in_channels or image_size
    with pytest.raises(ConfigError, match="model.name: "):
        pipeline.base_arch(pipeline.context(resolve_config(overrides=[f"data.dataset={data}", "model.name=x.py:Net", f"runs={tmp_path}"])))


def test_an_npz_of_non_square_images_runs_through(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    np.savez(tmp_path / "wide.npz", x=rng.integers(0, 255, (80, 8, 12, 3), dtype=np.uint8), y=y)
    model = my_net()
    cfg = resolve_config(overrides=[*own_settings(tmp_path, "wide"), f"data.dataset={tmp_path / 'wide.npz'}", "export.onnx=false"])
    result = pipeline.run(cfg, model=model)
    assert result.export["macs"]["original"] == gross.count_macs(model, (3, 8, 12)).total


def test_a_network_with_another_number_of_outputs_is_refused(tmp_path):
    cfg = resolve_config(overrides=own_settings(tmp_path, "classes"))
    with pytest.raises(ConfigError, match="the module given in Python gives 7 outputs but the data has 4 classes"):
        pipeline.run(cfg, model=my_net(num_classes=7))
