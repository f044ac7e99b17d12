"""The README's examples are true of the program: its Python block runs, its commands parse."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from gross import cli
from gross.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


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
    assert len(blocks("python")) == 1 and len(command_lines()) >= 8


def test_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks("python")[0], "README.md", "exec"), {})


@pytest.mark.parametrize("argv", command_lines(), ids=" ".join)
def test_commands_parse_and_their_settings_resolve(argv, monkeypatch, tmp_path):
    args = cli.build_parser().parse_args(argv)
    if args.config_file:
        args.config_file = str(REPO / args.config_file)
    monkeypatch.chdir(tmp_path)  # no run folder of this checkout is read
    cli._resolve(args)  # unknown keys and bad values raise ConfigError


def test_settings_named_in_the_readme_exist():
    sections = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    files = {"npz", "json", "jsonl", "csv", "yaml", "md", "png", "py", "safetensors", "onnx"}
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
