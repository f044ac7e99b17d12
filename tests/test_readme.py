"""The README's and docs/' examples are true of the program: Python blocks run, YAML resolves, commands parse."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gross
from gross import cli
from gross.config import Config, resolve_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README = "\n".join(path.read_text() for path in DOCS)


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def command_lines() -> list[list[str]]:
    """Every ``gross ...`` command of the bash blocks, as argv after the program name."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["gross"]:
                    out.append(words[1:])
                elif "gross.cli" in words:  # torchrun ... -m gross.cli COMMAND ...
                    out.append(words[words.index("gross.cli") + 1 :])
    return out


def test_the_readme_has_what_the_tests_check():
    assert len(blocks("python")) >= 2 and len(blocks("yaml")) >= 1 and len(command_lines()) >= 8


def own_network_files(folder: Path) -> None:
    """What the README's "own network" section assumes: mynet.py, its trained weights, an image folder."""
    for name in ("mynet.py", "blocks.py"):
        shutil.copy(REPO / "tests" / "user_model" / name, folder / name)
    sys.path.insert(0, str(folder))
    try:
        from mynet import MyNet
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    torch.save(MyNet(width=32).state_dict(), folder / "mynet.pt")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for c in range(10):
            (folder / "images" / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) // 2 + 12 * c
                Image.fromarray(pixels).save(folder / "images" / split / f"class{c}" / f"{i}.png")


# The blocks run as written, only shorter: every training stage gets one epoch and the BTD a few
# steps (TINY is added to whatever the block resolves).
TINY = ["train.epochs=1", "decompose.btd={max_iter: 3}", "reconstruct.epochs=1", "finetune.epochs=1",
        "evaluate.samples=2", "latency.repeats=3", "device=cpu"]  # fmt: skip


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    own_network_files(tmp_path)
    resolve = gross.config.resolve_config
    monkeypatch.setattr(gross.config, "resolve_config", lambda files=(), overrides=(): resolve(files, [*overrides, *TINY]))
    exec(compile(blocks("python")[index], "README.md", "exec"), {})


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_yaml_blocks_resolve(index, tmp_path):
    (tmp_path / "block.yaml").write_text(blocks("yaml")[index])
    resolve_config([tmp_path / "block.yaml"])  # unknown keys and bad values raise ConfigError


def test_the_own_network_yaml_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own_network_files(tmp_path)
    (tmp_path / "mynet.yaml").write_text(blocks("yaml")[0])
    argv = ["run", "-q", "-c", "mynet.yaml", *[a for setting in TINY for a in ("--set", setting)]]
    assert cli.main(argv) == 0
    assert (tmp_path / "runs" / "mynet" / "export" / "net.safetensors").is_file()


@pytest.mark.parametrize("argv", command_lines(), ids=" ".join)
def test_commands_parse_and_their_settings_resolve(argv, monkeypatch, tmp_path):
    args = cli.build_parser().parse_args(argv)
    if args.config_file:
        args.config_file = str(REPO / args.config_file)
    monkeypatch.chdir(tmp_path)  # no run folder of this checkout is read
    cli._resolve(args)  # unknown keys and bad values raise ConfigError


def test_settings_named_in_the_readme_exist():
    sections = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    files = {"npz", "json", "jsonl", "csv", "yaml", "md", "png", "py", "safetensors", "onnx", "pt", "pt2", "load"}
    named = set(re.findall(r"`(?:--set )?([a-z_]+)\.([a-z_]+)(?:=[^`]*)?`", README))
    checked = [(s, k) for s, k in named if dataclasses.is_dataclass(sections.get(s)) and k not in files]
    assert ("data", "dataset") in checked
    for section, key in checked:
        fields = {f.name for f in dataclasses.fields(sections[section])}
        assert key in fields, f"README names {section}.{key}; {section} has {sorted(fields)}"


def test_library_names_in_the_readme_and_the_help_exist(capsys):
    import gross

    texts = [README]
    for command in [None, *cli.build_parser()._subparsers._group_actions[0].choices]:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"] if command else ["--help"])
        texts.append(capsys.readouterr().out)
    names = set(re.findall(r"\bgross((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", "\n".join(texts)))
    assert ".load" in names and ".export" in names
    for name in names - {".cli"}:  # gross.cli is run with python -m, as a module
        value = gross
        for part in name.split(".")[1:]:
            value = getattr(value, part)  # AttributeError: the docs name something that is not there
