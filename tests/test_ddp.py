"""Data-parallel training: two CPU processes (gloo) stay identical and match one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gross
from gross import checkpoint as ckpt
from gross import train
from gross.config import FinetuneConfig, ReconstructConfig, TrainConfig
from gross.data import Dataset, Splits
from gross.models import PaperNet

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def tiny_splits(n: int = 64 + 32, size: int = 16, classes: int = 4) -> Splits:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 255, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    full = Dataset(images, labels, tuple("abcd"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Splits(full.subset(torch.arange(64)), full.subset(torch.arange(64, n)), full.subset(torch.arange(64, n)))


def load(path: Path) -> torch.nn.Module:
    model, _ = ckpt.load_model(path)
    model.dropout.p = 0.0  # dropout masks differ per process; without it one process is comparable
    return model


def run_stage(stage: str, model_path: Path, out_dir: Path | None) -> tuple[torch.nn.Module, list, list]:
    torch.set_num_threads(1)
    model = load(model_path)
    seen: list = []
    if stage in ("finetune", "reconstruct"):
        model.register_forward_pre_hook(lambda m, i: seen.append(gross.get_config(m)) if m.training else None)
    if stage == "finetune":
        history = train.finetune(model, tiny_splits(), FinetuneConfig(epochs=2, batch_size=15, lr=0.05, alpha=0.0), out_dir=out_dir)
    elif stage == "reconstruct":
        # bn_eval off: the model runs in training mode, so that the hook above sees every step.
        cfg = ReconstructConfig(epochs=2, batch_size=15, lr=0.05, alpha=0.0, bn_eval=False)
        history = train.reconstruct(model, load(model_path.with_name("original.safetensors")), tiny_splits(), cfg, out_dir=out_dir)
    else:
        history = train.train_base(model, tiny_splits(), TrainConfig(epochs=2, batch_size=15, lr=0.05), out_dir=out_dir)
    return model, seen, history


def worker(rank: int, world: int, folder: str, stage: str) -> None:
    folder_path = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder_path / 'rendezvous'}", rank=rank, world_size=world)
    try:
        model, seen, history = run_stage(stage, folder_path / "start.safetensors", folder_path / "run")
        ckpt.save_tensors(folder_path / f"rank{rank}.safetensors", model.state_dict(),
                          {"seen": [list(c) for c in seen], "history": history})
    finally:
        dist.destroy_process_group()


def start_model(folder: Path, decomposed: bool) -> None:
    torch.manual_seed(0)
    model = PaperNet(num_classes=4, widths=(4, 4, 8, 8), image_size=16)
    kwargs = {"num_classes": 4, "widths": [4, 4, 8, 8], "image_size": 16}
    ckpt.save_model(folder / "original.safetensors", model, ckpt.make_arch("paper", kwargs))
    if decomposed:
        gross.decompose(model, max_iter=10)
    ckpt.save_model(folder / "start.safetensors", model, ckpt.make_arch("paper", kwargs, model))


@pytest.mark.parametrize("stage", ["finetune", "reconstruct", "train"])
def test_two_processes_stay_identical_and_match_one_process(tmp_path, stage):
    start_model(tmp_path, decomposed=stage != "train")
    mp.spawn(worker, args=(2, str(tmp_path), stage), nprocs=2, join=True)
    states = [ckpt.load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    (s0, m0), (s1, m1) = states
    for name in s0:
        assert torch.equal(s0[name], s1[name]), f"{name} differs between processes"
    def timeless(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert timeless(m0["history"]) == timeless(m1["history"])
    # Both processes drew the same configuration at every step.
    assert m0["seen"] == m1["seen"]
    # Only process 0 wrote the checkpoint, and it holds the final weights.
    tensors, meta = ckpt.load_tensors(tmp_path / "run" / train.CHECKPOINT)
    assert meta["world_size"] == 2 and meta["epoch"] == 2
    for name in s0:
        assert torch.equal(tensors[f"model.{name}"], s0[name])
    # One process on the whole batches takes the same steps, up to float summation order.
    single, seen, history = run_stage(stage, tmp_path / "start.safetensors", None)
    if stage != "train":
        assert [list(c) for c in seen] == m0["seen"]
    if stage == "reconstruct":
        return  # its loss is a norm over each process's images, not a sum over images: no equality to expect
    for name, value in single.state_dict().items():
        assert torch.allclose(value, s0[name], atol=1e-5, rtol=1e-4), name
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in m0["history"]], rel=1e-4)
    accuracies = [k for k in history[0] if k.startswith("val_acc")]
    assert [r[k] for r in history for k in accuracies] == pytest.approx([r[k] for r in m0["history"] for k in accuracies])
