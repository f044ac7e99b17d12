"""Tests of image folders (gross.imagefolder): layout, bad files, sizes, caching, and the same
batches in memory and streamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gross.data import Augmentation, DataError, Dataset, ResizedCrop, StreamedBatches, batches, load_dataset
from gross.imagefolder import ImageFiles, load_image_folder
from gross.train import _train_batches, calibration_batches, prepare_batches


def make_folder(
    root: Path,
    splits: dict[str, int] | None = None,
    classes: tuple[str, ...] = ("cat", "dog", "owl"),
    size: tuple[int, int] = (12, 12),
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """``root/<split>/<class>/<i>.<fmt>``: ``splits[split]`` random images per class."""
    rng = np.random.default_rng(seed)
    for split, per_class in (splits or {"train": 6}).items():
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.{fmt}")
    return root


def quiet(**kw):
    return load_image_folder(progress=False, log=None, workers=0, **kw)


# ---------------------------------------------------------------------------------------------
# Layout


def test_layout_and_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"train": 4, "val": 2, "test": 1})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "sub").mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "train" / "dog" / "sub" / "deep.jpg")
    lines: list[str] = []
    train, val, test = load_image_folder(root, progress=False, log=lines.append, workers=0)
    assert train.classes == ("cat", "dog", "owl")
    assert (len(train), len(val), len(test)) == (13, 6, 3)
    assert train.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    assert isinstance(train, Dataset) and train.images.shape == (13, 3, 12, 12)
    assert any("1 other files ignored" in line for line in lines)
    # Pixels are the files' own.
    first = np.array(Image.open(root / "train" / "cat" / "000.png"))
    assert torch.equal(train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_without_val_and_test(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"train": 5})
    lines: list[str] = []
    splits = load_dataset(root, val_size=0.2, seed=0, log=lines.append, progress=False, workers=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 3, 0)
    assert sorted(splits.val.labels.tolist()) == [0, 1, 2]  # stratified
    assert any("no test/ folder: the test split is empty" in line for line in lines)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda r: (r / "train").mkdir(parents=True), "train: no class folders"),
        (lambda r: (r / "train" / "a").mkdir(parents=True), "train/a: holds no images"),
        (lambda r: r.mkdir(), "no train/ image folder"),
        (lambda r: (make_folder(r, {"train": 1}), (r / "val" / "zebra").mkdir(parents=True)), "class 'zebra' is not in train/"),
        (lambda r: (make_folder(r, {"train": 1}), (r / "train" / "empty").mkdir()), "train/empty: holds no images"),
        (lambda r: ((r / "train" / "a").mkdir(parents=True), (r / "train" / "a" / "x.txt").write_text("")), "train/a: holds no images"),
    ],
)
def test_bad_layouts_say_what_is_expected(tmp_path: Path, build, match: str) -> None:
    root = tmp_path / "d"
    build(root)
    with pytest.raises(DataError, match=match) as err:
        load_dataset(root, progress=False, workers=0)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"train": 3})
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png: not a readable image.*data.skip_bad") as err:
        quiet(root=root)
    assert "\n" not in str(err.value)
    lines: list[str] = []
    train, _, _ = load_image_folder(root, skip_bad=True, progress=False, log=lines.append, workers=0)
    assert len(train) == 9 and any("1 unreadable images skipped" in line for line in lines)
    # A file whose header reads but whose pixels are cut short: found when decoding.
    bad.unlink()
    good = (root / "train" / "owl" / "000.png").read_bytes()
    (root / "train" / "owl" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut.png: not a readable image"):
        quiet(root=root)
    train, _, _ = quiet(root=root, skip_bad=True)
    assert len(train) == 9
    # Streamed, the damage is found when the batch holding it is decoded.
    train, _, _ = quiet(root=root, memory_gb=0)
    with pytest.raises(DataError, match="cut.png: not a readable image"):
        list(train.load([torch.arange(len(train))]))


def test_modes_and_channels(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for c, mode in (("gray", "L"), ("rgba", "RGBA"), ("pal", "P")):
        (root / "train" / c).mkdir(parents=True)
        Image.new(mode, (8, 8), 100 if mode != "RGBA" else (10, 20, 30, 40)).save(root / "train" / c / "0.png")
    train, _, _ = quiet(root=root)
    assert train.images.shape == (3, 3, 8, 8)
    assert train.classes == ("gray", "pal", "rgba") and train.images[2, :, 0, 0].tolist() == [10, 20, 30]  # alpha dropped
    train, _, _ = quiet(root=root, channels=1)
    assert train.images.shape == (3, 1, 8, 8) and train.mean == (0.5,)
    splits = load_dataset(root, channels=1, mean=[0.5, 0.5, 0.5], std=[0.2] * 3, progress=False, workers=0, val_size=0)
    assert splits.train.std == (0.2,)


def test_sizes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"train": 2}, size=(20, 30))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train" / "cat" / "small.png")
    with pytest.raises(DataError, match="2 different sizes .*set data.image_size"):
        quiet(root=root)
    train, _, _ = quiet(root=root, image_size=8, augment="pad_crop")
    assert train.images.shape[1:] == (3, 8, 8) and train.shape == (3, 8, 8)
    # A random resized crop keeps the margin the evaluation crop throws away.
    train, _, _ = quiet(root=root, image_size=[14, 7], augment="random_resized_crop")
    assert train.images.shape[1:] == (3, 16, 8) and train.shape == (3, 14, 7)
    x, _ = next(batches(train, 4))
    assert x.shape == (4, 3, 14, 7)
    x, _ = next(batches(train, 4, augmentation=ResizedCrop(), generator=torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 14, 7)


def test_resized_crop_whole_image_is_identity() -> None:
    images = torch.randint(0, 256, (3, 3, 9, 7), dtype=torch.uint8)
    whole = ResizedCrop(scale=(1.0, 1.0), ratio=(7 / 9, 7 / 9), flip=False)
    drawn = whole.draw(3, 9, 7, torch.Generator().manual_seed(0))
    assert drawn[0].tolist() == [[0, 0, 9, 7]] * 3
    assert torch.equal(whole.apply(images, drawn), images)
    boxes, _ = drawn
    flipped = whole.apply(images, (boxes, torch.tensor([True, False, True])))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    boxes, _ = ResizedCrop().draw(500, 40, 30, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    area = h * w / (40 * 30)
    assert area.min() >= 0.07 and area.max() <= 1.0


# ---------------------------------------------------------------------------------------------
# In memory, cached, streamed


def test_cache_is_reused_and_refreshed(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"train": 2})
    cache = tmp_path / "cache"
    lines: list[str] = []
    first, _, _ = load_image_folder(root, cache=cache, progress=False, log=lines.append, workers=0)
    assert any("cached in" in line for line in lines) and len(list(cache.glob("*.safetensors"))) == 1
    lines.clear()
    again, _, _ = load_image_folder(root, cache=cache, progress=False, log=lines.append, workers=0)
    assert any("read from the cache" in line for line in lines)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "train" / "cat" / "000.png")
    lines.clear()
    changed, _, _ = load_image_folder(root, cache=cache, progress=False, log=lines.append, workers=0)
    assert not any("read from the cache" in line for line in lines)
    assert changed.images[0].sum() == 0 and not torch.equal(changed.images, first.images)
    assert not list(cache.glob(".*tmp"))


@pytest.mark.parametrize("augment", ["pad_crop", "random_resized_crop"])
def test_streamed_gives_the_same_batches(tmp_path: Path, augment: str) -> None:
    root = make_folder(tmp_path / "d", {"train": 7, "val": 2}, size=(20, 24), fmt="jpg")
    kw = dict(image_size=16, augment=augment, val_size=0.25)
    memory = load_dataset(root, progress=False, workers=0, **kw)
    streamed = load_dataset(root, progress=False, workers=2, memory_gb=0, **kw)
    assert isinstance(streamed.train, ImageFiles) and isinstance(memory.train, Dataset)
    assert memory.train.shape == streamed.train.shape == (3, 16, 16)
    aug = Augmentation(pad=2) if augment == "pad_crop" else ResizedCrop()
    for a, b in zip(
        batches(memory.train, 5, shuffle=True, augmentation=aug, generator=torch.Generator().manual_seed(3)),
        batches(streamed.train, 5, shuffle=True, augmentation=aug, generator=torch.Generator().manual_seed(3)),
        strict=True,
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # The training loop's batches, for each process of a group of two.
    for rank in (0, 1):
        runs = [
            list(_train_batches(s.train, 4, augmentation=aug, generator=torch.Generator().manual_seed(5), device=torch.device("cpu"),
                                channels_last=False, rank=rank, world=2))
            for s in (memory, streamed)
        ]
        assert len(runs[0]) == len(runs[1]) == 5  # 21 images: the last batch of 1 cannot be shared by 2
        for (xa, ya, na), (xb, yb, nb) in zip(*runs):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and na == nb
    evaluated = prepare_batches(streamed.val, 4)
    assert isinstance(evaluated, StreamedBatches) and len(evaluated) == 2
    for (xa, ya), (xb, yb) in zip(prepare_batches(memory.val, 4), evaluated, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(evaluated[1][0], list(evaluated)[1][0])
    calib = [calibration_batches(s.train, 6, seed=1, batch_size=4, augmentation=aug) for s in (memory, streamed)]
    assert all(torch.equal(a, b) for a, b in zip(*calib, strict=True))


# ---------------------------------------------------------------------------------------------
# The pipeline on both paths


def _folder_run(tmp_path: Path, root: Path, name: str, *extra: str):
    from gross import pipeline
    from gross.config import resolve_config

    cfg = resolve_config(overrides=[
        f"data.dataset={root}", "data.val_size=0.25", "data.workers=0", "data.flip=true", "model.kwargs={widths: [4, 4, 8, 8]}",
        "train.epochs=1", "train.batch_size=8", "decompose.btd={max_iter: 5}", "reconstruct.epochs=1", "reconstruct.batch_size=8",
        "finetune.epochs=1", "finetune.batch_size=8", "evaluate.samples=2", "search.recalibrate=16", "latency.repeats=2",
        f"runs={tmp_path / 'runs'}", f"name={name}", "device=cpu", "export.onnx=false", *extra,
    ])
    return cfg, pipeline.run(cfg)


def test_pipeline_in_memory_and_streamed_agree(tmp_path: Path) -> None:
    import json

    root = make_folder(tmp_path / "d", {"train": 8, "test": 2}, size=(16, 16))
    cfg_m, memory = _folder_run(tmp_path, root, "memory")
    cfg_s, streamed = _folder_run(tmp_path, root, "streamed", "data.memory_gb=0")
    assert list((cfg_m.run_dir / "data-cache").glob("*.safetensors")) and not list((cfg_s.run_dir / "data-cache").glob("*.safetensors"))
    for stage in ("base", "reconstruct", "gross"):
        rows = [[json.loads(line) for line in (c.run_dir / stage / "metrics.jsonl").read_text().splitlines()] for c in (cfg_m, cfg_s)]
        for a, b in zip(*rows, strict=True):
            assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    results = [(c.run_dir / "search" / "results.csv").read_text() for c in (cfg_m, cfg_s)]
    assert results[0] == results[1]
    assert memory.export["config"] == streamed.export["config"]
    assert memory.export["input_shape"] == streamed.export["input_shape"] == [3, 16, 16]


def test_interrupted_streamed_epoch_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    from gross.config import TrainConfig
    from gross.models import PaperNet
    from gross.train import train_base

    root = make_folder(tmp_path / "d", {"train": 6}, size=(16, 16))
    splits = load_dataset(root, val_size=6, progress=False, workers=0, memory_gb=0)
    cfg = TrainConfig(epochs=2, batch_size=4, seed=1)

    def trained(out: Path, resume: bool = False) -> dict:
        torch.manual_seed(0)
        model = PaperNet(widths=(4, 4, 8, 8), num_classes=3, image_size=16)
        train_base(model, splits, cfg, out_dir=out, resume=resume, augmentation=Augmentation(pad=2, flip=True))
        return model.state_dict()

    full = trained(tmp_path / "full")
    assert len(splits.train) == 12  # 3 batches of 4 an epoch
    # Stop two batches into the second epoch, as a kill would, then resume from epoch 1's checkpoint.
    real = ImageFiles.load
    calls = {"n": 0}

    def stopping(self, index_batches, device=None):
        index_batches = list(index_batches)
        calls["n"] += len(index_batches) == 3  # the training epochs' 3 batches, not validation's one
        for i, x in enumerate(real(self, index_batches, device)):
            if calls["n"] == 2 and i == 2:
                raise KeyboardInterrupt
            yield x

    monkeypatch.setattr(ImageFiles, "load", stopping)
    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path / "cut")
    monkeypatch.setattr(ImageFiles, "load", real)
    resumed = trained(tmp_path / "cut", resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
