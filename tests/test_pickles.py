"""No loader a user can point at a file unpickles it: a pickle is refused with one clear line.

Each payload, once unpickled, would create a marker file (its ``__reduce__`` calls
``Path.touch``), so a test sees both the refusal and that nothing ran.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import gross
from gross import checkpoint as ckpt
from gross.cli import main
from gross.models import PaperNet

from test_cli import error_line, tiny_args


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: the code any pickle may carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_payload(path: Path, kind: str) -> Path:
    """A pickle where a safetensors file belongs; returns the marker its unpickling would create."""
    marker = path.parent / f"{path.name}.ran"
    if kind == "torch.save":  # a state dict as torch.save writes it (zip with data.pkl), one entry carrying code
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "extra": Payload(marker)}, path)
    else:  # a bare pickle of a custom class
        path.write_bytes(pickle.dumps(Payload(marker)))
    return marker


KINDS = ["torch.save", "pickle"]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])  # torch.load itself treats the two names apart
@pytest.mark.parametrize("loader", ["read_meta", "load_tensors", "load_model", "load_training_state"])
def test_checkpoint_loaders_refuse_a_pickle(tmp_path, kind, name, loader):
    path = tmp_path / name
    marker = write_payload(path, kind)
    model = PaperNet(widths=(4, 4, 8, 8))
    calls = {
        "read_meta": lambda: ckpt.read_meta(path),
        "load_tensors": lambda: ckpt.load_tensors(path),
        "load_model": lambda: ckpt.load_model(path),
        "load_training_state": lambda: ckpt.load_training_state(
            path, model, torch.optim.SGD(model.parameters(), lr=0.1), {"data": torch.Generator()}
        ),
    }
    with pytest.raises(ckpt.CheckpointError) as info:
        calls[loader]()
    assert one_line(info.value).startswith(f"{path} is corrupt or not a gross checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_export_loader_refuses_a_pickle(tmp_path, kind):
    torch.manual_seed(0)
    net = gross.decompose(PaperNet(widths=(4, 4, 8, 8)), skip=["conv1"], max_iter=2)
    gross.save(gross.export(net, tuple(s[0] for s in gross.search_space(net))), tmp_path / "export")
    gross.load(tmp_path / "export", PaperNet(widths=(4, 4, 8, 8)))  # the folder as written loads
    marker = write_payload(tmp_path / "export" / "net.safetensors", kind)
    with pytest.raises(ValueError) as info:
        gross.load(tmp_path / "export", PaperNet(widths=(4, 4, 8, 8)))
    assert one_line(info.value).startswith(f"{tmp_path / 'export' / 'net.safetensors'} is not a readable safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_refuses_a_pickle_wherever_it_reads_a_checkpoint(tmp_path, capsys, kind):
    args = tiny_args(tmp_path)
    run = tmp_path / "runs" / "t"
    # gross evaluate --checkpoint: a file named by the user.
    user_file = tmp_path / "mine.pt"
    marker = write_payload(user_file, kind)
    assert main(["evaluate", *args, "--checkpoint", str(user_file)]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"gross: error: {user_file} is corrupt or not a gross checkpoint"), line
    assert not marker.exists()
    # A stage's output read by the next stage, and an interrupted stage's checkpoint read by --resume.
    for path, command in [(run / "base" / "model.safetensors", "decompose"), (run / "base" / "checkpoint.safetensors", "train")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = write_payload(path, kind)
        assert main([command, *args, *(["--resume"] if command == "train" else [])]) == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"gross: error: {path} is corrupt or not a gross checkpoint"), line
        assert not marker.exists()
        path.unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_dataset_loader_refuses_a_pickle(tmp_path, kind):
    # data.dataset=FILE.npz: read with allow_pickle=False (a torch.save file is a zip archive too).
    path = tmp_path / "data.npz"
    marker = write_payload(path, kind)
    with pytest.raises(gross.data.DataError) as info:
        gross.data.load_npz(path)
    assert one_line(info.value).startswith(f"{path}: ")
    assert not marker.exists()
