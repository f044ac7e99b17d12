"""Tests of gross.train and gross.checkpoint: loops, reconstruction maths, sampling, checkpoints."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gross
from gross import checkpoint as ckpt
from gross import train
from gross.config import FinetuneConfig, ReconstructConfig, TrainConfig, milestone_epochs
from gross.data import Augmentation, Dataset, Splits, batches
from gross.expand import expand
from gross.models import PaperNet
from gross.series import GroSSConv2d


def tiny_splits(n: int = 96, size: int = 16, classes: int = 4, seed: int = 0) -> Splits:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    # Class-dependent brightness so that a network can learn something.
    images = torch.randint(0, 128, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    images = (images + (labels * 30).view(-1, 1, 1, 1).to(torch.uint8)).clamp(0, 255).to(torch.uint8)
    names = tuple(str(i) for i in range(classes))
    full = Dataset(images, labels, names, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Splits(full.subset(torch.arange(0, n - 32)), full.subset(torch.arange(n - 32, n)), full.subset(torch.arange(n - 32, n)))


def tiny_net(widths=(4, 4, 8, 8), seed: int = 0) -> PaperNet:
    torch.manual_seed(seed)
    return PaperNet(num_classes=4, widths=widths, image_size=16)


def exact_series(conv: nn.Conv2d, sizes=(2, 4)) -> GroSSConv2d:
    """A GroSS layer whose largest size reproduces ``conv`` exactly (C_out <= C_in), smaller ones not.

    With D = C_in, P = I, R = W padded with zero rows and Q = [I, 0], the bottleneck at the
    full group size equals the conv. The smaller sizes hold seeded random bottlenecks.
    """
    c_out, c_in, kh, kw = conv.weight.shape
    assert c_out <= c_in and sizes[-1] == c_in
    layer = GroSSConv2d(c_in, c_out, (kh, kw), padding=conv.padding, group_sizes=sizes)
    gen = torch.Generator().manual_seed(1)
    fits = []
    for s in sizes[:-1]:
        fits.append((torch.randn(c_in, c_in, 1, 1, generator=gen), torch.randn(c_in, s, kh, kw, generator=gen) * 0.1,
                     torch.randn(c_out, c_in, 1, 1, generator=gen)))
    full_r = torch.zeros(c_in, c_in, kh, kw)
    full_r[:c_out] = conv.weight.detach()
    fits.append((torch.eye(c_in).view(c_in, c_in, 1, 1), full_r, torch.eye(c_out, c_in).view(c_out, c_in, 1, 1)))
    with torch.no_grad():
        prev = None
        for i, (s, (p, r, q)) in enumerate(zip(sizes, fits)):
            if prev is None:
                layer.first[i].copy_(p), layer.core[i].copy_(r), layer.last[i].copy_(q)
            else:
                pp, pr, pq, ps = prev
                layer.first[i].copy_(p - pp), layer.core[i].copy_(r - expand(pr, ps, s)), layer.last[i].copy_(q - pq)
            prev = (p, r, q, s)
        layer.bias.copy_(conv.bias.detach())
    return layer


def exact_gross_net(seed: int = 0) -> tuple[PaperNet, PaperNet]:
    original = tiny_net((4, 4, 4, 4), seed).eval()
    model = copy.deepcopy(original)
    for name in ("conv2", "conv3", "conv4"):
        setattr(model, name, exact_series(getattr(original, name)))
    return original, model


# ---------------------------------------------------------------------------------------------
# Evaluation and batches


def test_evaluate_matches_a_manual_loop_and_restores_state():
    original, model = exact_gross_net()
    data = tiny_splits().val
    gross.set_config(model, (2, 2, 2))
    model.train()
    result = train.evaluate(model, data, (4, 4, 4), batch_size=7)
    assert gross.get_config(model) == (2, 2, 2) and model.training
    with torch.no_grad():
        x, y = next(batches(data, len(data)))
        logits = original.eval()(x)
    assert result.count == len(data)
    assert result.accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    prepared = train.prepare_batches(data, 7)
    assert train.evaluate(model, prepared, (4, 4, 4)) == result


def test_one_process_batches_equal_data_batches():
    data = tiny_splits().train
    aug = Augmentation(pad=2, flip=True)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = list(train._train_batches(data, 10, augmentation=aug, generator=g1, device=torch.device("cpu"),
                                     channels_last=False, rank=0, world=1))
    theirs = list(batches(data, 10, shuffle=True, augmentation=aug, generator=g2))
    assert len(ours) == len(theirs)
    for (x, y, n), (x2, y2) in zip(ours, theirs):
        assert n == len(y2) and torch.equal(x, x2) and torch.equal(y, y2)


def test_shards_of_two_processes_make_up_the_global_batch():
    data = tiny_splits().train
    aug = Augmentation(pad=2)
    full = list(train._train_batches(data, 10, augmentation=aug, generator=torch.Generator().manual_seed(3),
                                     device=torch.device("cpu"), channels_last=False, rank=0, world=1))
    parts = [list(train._train_batches(data, 10, augmentation=aug, generator=torch.Generator().manual_seed(3),
                                       device=torch.device("cpu"), channels_last=False, rank=r, world=2)) for r in (0, 1)]
    for (x, y, n), (x0, y0, n0), (x1, y1, n1) in zip(full, *parts):
        assert n == n0 == n1
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


# ---------------------------------------------------------------------------------------------
# Reconstruction


def test_reconstruction_loss_is_zero_for_an_exact_decomposition():
    original, model = exact_gross_net()
    x = train.prepare_batches(tiny_splits().val, 32)[0][0]
    gross.set_config(model, (4, 4, 4))
    assert train.reconstruction_loss(model, original, x).item() < 1e-5
    gross.set_config(model, (2, 4, 4))
    assert train.reconstruction_loss(model, original, x).item() > 1e-2


def test_reconstruction_loss_is_the_sum_of_relative_errors():
    original, model = exact_gross_net()
    gross.set_config(model, (2, 2, 4))
    x = train.prepare_batches(tiny_splits().val, 32)[0][0]
    acts, ref = {}, {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in ("conv2", "conv3", "conv4")]
    hooks += [getattr(original, n).register_forward_hook(lambda m, i, o, n=n: ref.__setitem__(n, o)) for n in ("conv2", "conv3", "conv4")]
    with torch.no_grad():
        model(x), original(x)
    for h in hooks:
        h.remove()
    expected = sum((acts[n] - ref[n]).norm() / ref[n].norm() for n in acts)
    assert train.reconstruction_loss(model, original, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_reconstruct_trains_only_the_gross_terms():
    original, model = exact_gross_net()
    data = tiny_splits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    orig_before = {k: v.clone() for k, v in original.state_dict().items()}
    cfg = ReconstructConfig(epochs=1, batch_size=16, lr=0.05, alpha=0.0, milestones=[])
    history = train.reconstruct(model, original, data, cfg)
    assert len(history) == 1 and history[0]["loss"] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[1] in ("first", "core", "last") for k in changed)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in orig_before.items())
    # The flags are restored, and the model is left at its largest configuration.
    assert all(p.requires_grad for p in model.parameters())
    assert gross.get_config(model) == (4, 4, 4)


def test_reconstruction_reduces_the_loss():
    original, model = exact_gross_net()
    data = tiny_splits()
    x = train.prepare_batches(data.val, 32)[0][0]
    gross.set_config(model, (2, 2, 2))
    start = train.reconstruction_loss(model, original, x).item()
    cfg = ReconstructConfig(epochs=3, batch_size=16, lr=0.002, alpha=20.0, milestones=[], weight_decay=0.0)
    train.reconstruct(model, original, data, cfg)
    gross.set_config(model, (2, 2, 2))
    assert train.reconstruction_loss(model, original, x).item() < start


# ---------------------------------------------------------------------------------------------
# Finetuning and sampling


def _record_configs(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, i: seen.append(gross.get_config(m)) if m.training else None)
    return seen, handle


def test_finetune_samples_the_same_configurations_for_the_same_seed():
    data = tiny_splits()
    runs = []
    for seed in (0, 0, 1):
        _, model = exact_gross_net()
        seen, handle = _record_configs(model)
        train.finetune(model, data, FinetuneConfig(epochs=2, batch_size=16, lr=0.01, alpha=0.0, seed=seed))
        handle.remove()
        runs.append(seen)
    assert len(runs[0]) == 8
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len(set(runs[0])) > 1


def test_finetune_freezes_everything_but_the_terms_and_skips_inactive_terms():
    _, model = exact_gross_net()
    data = tiny_splits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # alpha large: always the smallest size, so the second term of every layer is never used.
    train.finetune(model, data, FinetuneConfig(epochs=1, batch_size=16, lr=0.05, alpha=50.0))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {f"{layer}.{part}.0" for layer in ("conv2", "conv3", "conv4") for part in ("first", "core", "last")}
    assert changed == expected


def test_finetune_improves_accuracy_at_a_configuration():
    _, model = exact_gross_net()
    data = tiny_splits()
    start = train.evaluate(model, data.train, (2, 2, 2)).loss
    history = train.finetune(model, data, FinetuneConfig(epochs=3, batch_size=16, lr=0.05, alpha=50.0, milestones=[]))
    assert train.evaluate(model, data.train, (2, 2, 2)).loss < start
    # Validation accuracy is named by configuration: the largest and the smallest.
    largest, smallest = (gross.model.format_config(s[i] for s in gross.search_space(model)) for i in (-1, 0))
    assert {f"val_acc_{largest}", f"val_acc_{smallest}"} <= set(history[-1])


def test_base_training_learns_and_writes_metrics(tmp_path):
    model = tiny_net()
    data = tiny_splits()
    start = train.evaluate(model, data.train).loss
    history = train.train_base(model, data, TrainConfig(epochs=3, batch_size=16, lr=0.05), out_dir=tmp_path, augmentation=None)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert train.evaluate(model, data.train).loss < start
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == history and {"loss", "acc", "val_loss", "val_acc", "lr"} <= set(rows[0])
    assert (tmp_path / train.CHECKPOINT).is_file()


def test_learning_rate_schedule():
    cfg = TrainConfig(epochs=100, lr=0.1, milestones=[0.5, 0.75])
    assert milestone_epochs(cfg.milestones, cfg.epochs) == [50, 75]
    assert [round(train._lr_at(cfg, e), 6) for e in (0, 49, 50, 74, 75, 99)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert milestone_epochs([80, 120], 150) == [80, 120]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    model = tiny_net()
    data = tiny_splits()
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += module.training
        return output * float("nan") if calls["n"] > 6 and module.training else output

    model.register_forward_hook(poison)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01)  # 4 steps per epoch
    with pytest.raises(train.TrainingError, match=r"loss became nan in epoch 2, step 3; lower train.lr") as info:
        train.train_base(model, data, cfg, out_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert ckpt.read_meta(tmp_path / train.CHECKPOINT)["epoch"] == 1


# ---------------------------------------------------------------------------------------------
# Resume


class Killed(Exception):
    """Raised right after the first epoch checkpoint is written: the process dies there."""


def kill_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch, stage, *args, **kwargs) -> None:
    """Run ``stage(*args, **kwargs)`` until its first checkpoint is on disk."""
    real_save = train.save_training_state

    def save_then_die(*save_args, **save_kwargs):
        real_save(*save_args, **save_kwargs)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(train, "save_training_state", save_then_die)
        with pytest.raises(Killed):
            stage(*args, **kwargs)


def test_resume_from_an_epoch_checkpoint_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = tiny_splits()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    reference = tiny_net()
    ref_hist = train.train_base(reference, data, cfg)
    kill_after_first_checkpoint(monkeypatch, train.train_base, tiny_net(), data, cfg, out_dir=tmp_path)
    resumed = tiny_net(seed=99)
    hist = train.train_base(resumed, data, cfg, out_dir=tmp_path, resume=True)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[1:] == [{**r, "seconds": hist[i + 1]["seconds"]} for i, r in enumerate(ref_hist[1:])]


def test_resume_with_other_settings_is_refused(tmp_path):
    data = tiny_splits()
    train.train_base(tiny_net(), data, TrainConfig(epochs=1, batch_size=16), out_dir=tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"lr=0.05 \(now 0.2\)"):
        train.train_base(tiny_net(), data, TrainConfig(epochs=2, batch_size=16, lr=0.2), out_dir=tmp_path, resume=True)


def test_resume_of_gross_stage_restores_the_sampler(tmp_path, monkeypatch):
    data = tiny_splits()
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.01, alpha=0.0)
    _, ref = exact_gross_net()
    seen_ref, h = _record_configs(ref)
    train.finetune(ref, data, cfg)
    h.remove()
    one = tmp_path / "one"
    kill_after_first_checkpoint(monkeypatch, train.finetune, exact_gross_net()[1], data, cfg, out_dir=one)
    _, resumed = exact_gross_net(seed=5)
    seen, h = _record_configs(resumed)
    train.finetune(resumed, data, cfg, out_dir=one, resume=True)
    h.remove()
    assert seen == seen_ref[len(seen_ref) - len(seen):]
    for name, value in ref.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    model = tiny_net()
    arch = ckpt.make_arch("paper", {"num_classes": 4, "widths": [4, 4, 8, 8], "image_size": 16})
    ckpt.save_model(target, model, arch)
    old = target.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    other = tiny_net(seed=7)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_model(target, other, arch)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    loaded, _ = ckpt.load_model(target, expect=arch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_atomic_write_interrupted_midway_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    ckpt.atomic_write(target, b"old")
    real_fdopen = os.fdopen

    class Half:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_stale_temporaries_are_cleaned(tmp_path):
    (tmp_path / ".m.safetensors.abc.tmp").write_bytes(b"half")
    ckpt.atomic_write(tmp_path / "m.safetensors", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_atomic_write_gives_files_the_mode_of_the_umask(tmp_path):
    mask = os.umask(0o027)
    try:
        ckpt.atomic_write(tmp_path / "a", b"x")
        (tmp_path / "b").write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777 == 0o640


def test_model_round_trip_with_gross_layers(tmp_path):
    _, model = exact_gross_net()
    gross.set_config(model, (2, 4, 2))
    arch = ckpt.make_arch("paper", {"num_classes": 4, "widths": [4, 4, 4, 4], "image_size": 16}, model)
    ckpt.save_model(tmp_path / "m.safetensors", model, arch, {"note": 1}, sidecar=tmp_path / "arch.json")
    loaded, meta = ckpt.load_model(tmp_path / "m.safetensors")
    assert meta["note"] == 1 and json.loads((tmp_path / "arch.json").read_text())["arch"] == meta["arch"]
    assert gross.get_config(loaded) == (2, 4, 2)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))


def test_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path):
    arch = ckpt.make_arch("paper", {"num_classes": 4, "widths": [4, 4, 8, 8], "image_size": 16})
    ckpt.save_model(tmp_path / "m.safetensors", tiny_net(), arch)
    other = ckpt.make_arch("paper", {"num_classes": 4, "widths": [8, 8, 8, 8], "image_size": 16})
    with pytest.raises(ckpt.CheckpointError, match="holds paper.*but this run's model is paper") as info:
        ckpt.load_model(tmp_path / "m.safetensors", expect=other)
    assert "\n" not in str(info.value)
    # A state dict that does not fit (same name, other shapes) is caught too.
    bad = dict(arch, kwargs={**arch["kwargs"], "widths": [8, 8, 8, 8]})
    tensors, meta = ckpt.load_tensors(tmp_path / "m.safetensors")
    ckpt.save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "arch": bad})
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model"):
        ckpt.load_model(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "m.safetensors"
    if content is None:
        ckpt.save_model(path, tiny_net(), ckpt.make_arch("paper", {}))
        path.write_bytes(path.read_bytes()[:-100])  # truncated
    else:
        path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="corrupt") as info:
        ckpt.load_model(path)
    assert "\n" not in str(info.value)


def test_optimizer_state_round_trip(tmp_path):
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    gen = torch.Generator().manual_seed(3)
    torch.rand(3, generator=gen)
    ckpt.save_training_state(tmp_path / "c.safetensors", model, opt, {"data": gen}, {"epoch": 1})
    model2 = tiny_net(seed=4)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    gen2 = torch.Generator()
    meta = ckpt.load_training_state(tmp_path / "c.safetensors", model2, opt2, {"data": gen2})
    assert meta["epoch"] == 1
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["weight_decay"] == 1e-3
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    assert torch.equal(gen.get_state(), gen2.get_state())


# ---------------------------------------------------------------------------------------------
# Fixed configurations


def test_decompose_fixed_and_train_fixed(tmp_path):
    original = tiny_net((4, 4, 8, 8))
    data = tiny_splits()
    model, history = train.train_fixed(
        original, {"conv2": 2, "conv3": 4}, data,
        ReconstructConfig(epochs=1, batch_size=32), FinetuneConfig(epochs=1, batch_size=32),
        btd_options={"max_iter": 20}, out_dir=tmp_path,
    )
    assert gross.search_space(model) == ((2,), (4,))
    assert type(original.conv2) is nn.Conv2d  # the original is left alone
    assert set(history) == {"reconstruct", "finetune"} and len(history["finetune"]) == 1
    assert (tmp_path / "reconstruct" / train.CHECKPOINT).is_file()
    assert "val_acc" in history["finetune"][0]
    with pytest.raises(ValueError, match="do not exist: \\['conv9'\\]"):
        train.decompose_fixed(tiny_net(), {"conv9": 2})


def test_calibration_batches_are_seeded_augmented_and_checked():
    from gross.data import Augmentation, Dataset
    from gross.train import calibration_batches

    gen = torch.Generator().manual_seed(0)
    data = Dataset(torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(30) % 3, ("a", "b", "c"), (0.5,) * 3, (0.5,) * 3)
    clean = calibration_batches(data, 12, seed=1, batch_size=5)
    assert [len(x) for x in clean] == [5, 5, 2]
    # The clean images are 12 distinct rows of the dataset, normalised.
    rows = torch.cat(clean) * 0.5 + 0.5
    source = data.images.float() / 255
    assert all(any(torch.allclose(r, s, atol=1e-6) for s in source) for r in rows)
    aug = Augmentation(pad=2, flip=True)
    a, b = calibration_batches(data, 12, seed=1, augmentation=aug), calibration_batches(data, 12, seed=1, augmentation=aug)
    assert torch.equal(torch.cat(a), torch.cat(b)) and not torch.equal(torch.cat(a), torch.cat(clean))
    with pytest.raises(ValueError, match="cannot draw 31"):
        calibration_batches(data, 31)


@pytest.mark.parametrize("form", ["normalised", "literal"])
@pytest.mark.parametrize("stage", ["finetune", "reconstruct"])
def test_gross_stages_draw_group_sizes_with_the_configured_form(stage, form):
    # Two sizes per layer at alpha 2: the smallest is drawn with probability 0.731 (normalised,
    # exp(-alpha i / N)) or 0.881 (literal, exp(-alpha i)). 64 steps of 3 layers give 192 draws,
    # whose frequency has a standard deviation of at most 0.032: the forms are 0.15 apart (the run is seeded).
    original, model = exact_gross_net()
    data = tiny_splits(n=96)
    seen, handle = _record_configs(model)
    options = dict(epochs=1, batch_size=1, lr=0.0, alpha=2.0, sampling=form)
    if stage == "finetune":
        train.finetune(model, data, FinetuneConfig(**options))
    else:
        # bn_eval off: the model trains in training mode, where the hook records its forwards.
        train.reconstruct(model, original, data, ReconstructConfig(bn_eval=False, **options))
    handle.remove()
    assert len(seen) == 64
    smallest = sum(c == 2 for config in seen for c in config) / (3 * len(seen))
    expected = {f: float(gross.sampling.group_size_probs(2, 2.0, f)[0]) for f in ("normalised", "literal")}
    assert abs(smallest - expected[form]) < 0.06, (smallest, expected)


def test_distillation_loss_is_the_tempered_kl_divergence_summed_over_the_batch():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)
    t = 3.0
    p, q = torch.softmax(teacher / t, 1), torch.softmax(student / t, 1)
    expected = t * t * (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(train.distillation_loss(student, teacher, t), expected)
    assert float(train.distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("distill, sandwich", [(0.0, True), (0.7, False), (0.7, True)])
def test_one_finetune_step_with_distillation_and_sandwich_equals_the_manual_step(distill, sandwich):
    original, model = exact_gross_net()
    for net in (original, model):
        net.dropout.p = 0.0  # the reference below cannot replay dropout's draws
    data = tiny_splits()
    n = len(data.train)
    reference = copy.deepcopy(model)
    seen, handle = _record_configs(model)
    cfg = FinetuneConfig(epochs=1, batch_size=n, lr=0.1, momentum=0.0, weight_decay=0.0, alpha=0.0, milestones=[],
                         distill=distill, temperature=2.0, sandwich=sandwich)  # fmt: skip
    train.finetune(model, data, cfg, teacher=copy.deepcopy(original), augmentation=None, channels_last=False)
    handle.remove()
    largest, smallest = (tuple(s[i] for s in gross.search_space(model)) for i in (-1, 0))
    assert seen == ([largest, smallest] if sandwich else []) + seen[-1:] and len(seen) == (3 if sandwich else 1)
    # By hand: the mean over the trained configurations of (1 - w) CE + w T^2 KL, one SGD step.
    x = next(iter(batches(data.train, n, shuffle=False)))[0]
    y = data.train.labels
    with torch.no_grad():
        target = original.eval()(x)
    params = train.gross_parameters(reference)
    reference.train()
    total = 0
    for config in seen:
        gross.set_config(reference, config)
        logits = reference(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        if distill:
            loss = (1 - distill) * loss + distill * train.distillation_loss(logits, target, 2.0)
        total = total + loss / n / len(seen)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= 0.1 * g
    assert sum(g is not None for g in grads) >= 3  # the step moved the terms of every layer's active size
    for (name, after), before in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6, msg=name)


def test_distillation_needs_a_teacher():
    _, model = exact_gross_net()
    with pytest.raises(ValueError, match="finetune.distill needs the teacher"):
        train.finetune(model, tiny_splits(), FinetuneConfig(epochs=1, distill=0.5))


def test_distillation_leaves_the_teacher_as_it_was():
    original, model = exact_gross_net()
    teacher = original.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train.finetune(model, tiny_splits(), FinetuneConfig(epochs=1, batch_size=32, distill=0.5), teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.conv2.weight.is_contiguous()  # not converted to channels-last
