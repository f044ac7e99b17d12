"""Tests of gross.data: loaders on tiny synthetic files, splits, augmentation and batching."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gross import data
from gross.data import (
    CIFAR10_CLASSES,
    DIGITS_FILE,
    PAPER_MEAN,
    PAPER_STD,
    Augmentation,
    DataError,
    Dataset,
    apply_augmentation,
    augment,
    batches,
    download_cifar10,
    draw_augmentation,
    load_cifar10,
    load_dataset,
    load_digits,
    load_npz,
    load_npz_folder,
    normalize,
    num_batches,
    split,
    stratified_indices,
)

SHARED_CIFAR = Path("/work/shared/data/cifar10")
needs_shared_cifar = pytest.mark.skipif(
    not (SHARED_CIFAR / "train.npz").is_file(), reason="needs the CIFAR-10 npz copy in /work/shared"
)


# ---------------------------------------------------------------------------------------------
# Synthetic files


def _write_cifar_batch(path: Path, rng: np.random.Generator, n: int, protocol: int = 2) -> dict:
    batch = {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return batch


def _write_fake_cifar(root: Path, n: int = 4) -> tuple[Path, list[dict]]:
    """A ``cifar-10-batches-py`` folder in the official layout with ``n`` images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    # Alternate protocols: 2 is the official files' one, 4 is what Python 3 writes by default.
    written = [_write_cifar_batch(folder / nm, rng, n, 2 if i % 2 else 4) for i, nm in enumerate(names)]
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, written


def _write_npz(path: Path, n: int = 20, classes: int = 4, hw: int = 8, c: int = 3, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
    y = np.arange(n) % classes
    np.savez(path, x=x, y=y)
    return x, y


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Loaders


def test_load_cifar10_official_layout(tmp_path: Path) -> None:
    folder, written = _write_fake_cifar(tmp_path)
    for root in (tmp_path, folder):
        train, test = load_cifar10(root)
        assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
        assert test.images.shape == (4, 3, 32, 32)
        assert train.labels.dtype == torch.int64
        assert train.classes == CIFAR10_CLASSES
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
        row = written[1][b"data"][2]
        assert torch.equal(train.images[4 + 2, 1], torch.from_numpy(row[1024:2048].reshape(32, 32)))
        expected = sum((b[b"labels"] for b in written[:5]), [])
        assert train.labels.tolist() == expected
        assert test.labels.tolist() == written[5][b"labels"]


def test_load_npz_and_folder(tmp_path: Path) -> None:
    x, y = _write_npz(tmp_path / "train.npz", n=20, classes=4)
    xt, yt = _write_npz(tmp_path / "test.npz", n=8, classes=5, seed=1)
    ds = load_npz(tmp_path / "train.npz")
    assert ds.images.shape == (20, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == y.tolist() and ds.classes == ("0", "1", "2", "3")
    train, test = load_npz_folder(tmp_path)
    # The class list covers labels seen in either file.
    assert train.classes == test.classes == ("0", "1", "2", "3", "4")
    assert torch.equal(test.images, torch.from_numpy(xt).permute(0, 3, 1, 2))

    splits = load_dataset(tmp_path, val_size=4, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 8)


def test_single_npz_holds_out_fixed_test(tmp_path: Path) -> None:
    _write_npz(tmp_path / "all.npz", n=40, classes=4, c=1)
    a = load_dataset(tmp_path / "all.npz", val_size=0.25, seed=0)
    b = load_dataset(str(tmp_path / "all.npz"), val_size=0.25, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (24, 8, 8)
    assert a.train.images.shape[1] == 1 and a.train.mean == (0.5,)
    # The test part does not depend on the validation seed.
    assert torch.equal(a.test.images, b.test.images)


def test_load_dataset_cifar10_lookup(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    _write_npz(tmp_path / "cifar10" / "train.npz", n=20, classes=10, hw=32)
    _write_npz(tmp_path / "cifar10" / "test.npz", n=10, classes=10, hw=32)
    splits = load_dataset("cifar10", root=tmp_path, val_size=10)
    assert splits.train.classes == CIFAR10_CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 10, 10)
    # The original pickles win over an npz copy.
    _write_fake_cifar(tmp_path)
    splits = load_dataset("cifar10", root=tmp_path, val_size=0.2, mean=(0.4, 0.5, 0.6), std=(0.5,) * 3)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 4
    assert splits.test.mean == (0.4, 0.5, 0.6) and splits.val.std == (0.5,) * 3


def test_digits() -> None:
    train, test = load_digits()
    assert len(train) + len(test) == 1797 and len(test) == 359
    for ds in (train, test):
        assert ds.images.shape[1:] == (3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels.tolist()) == set(range(10)) and train.classes[3] == "3"
    counts = torch.bincount(test.labels, minlength=10).double()
    total = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10).double()
    assert ((counts - total * 359 / 1797).abs() <= 1).all()
    # The held-out digits are the same on every call.
    assert torch.equal(load_digits()[1].images, test.images)
    splits = load_dataset()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1150, 288, 359)


def test_shipped_digits_are_scikit_learns() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    with np.load(DIGITS_FILE) as shipped:
        assert np.array_equal(shipped["images"], digits.images) and np.array_equal(shipped["labels"], digits.target)
    assert DIGITS_FILE.stat().st_size < 100_000


@needs_shared_cifar
def test_shared_cifar10() -> None:
    splits = load_dataset("cifar10", root=SHARED_CIFAR.parent, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40000, 10000, 10000)
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(splits.val.labels).tolist() == [1000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((4, 8, 8, 3), np.float32), "y": np.zeros(4, np.int64)},  # not uint8
        {"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.int64)},  # no channel axis
        {"x": np.zeros((4, 8, 8, 5), np.uint8), "y": np.zeros(4, np.int64)},  # 5 channels
        {"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(3, np.int64)},  # lengths differ
        {"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, 1, -1, 2])},  # negative
        {"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(4, np.float32)},  # float labels
        {"x": np.zeros((0, 8, 8, 3), np.uint8), "y": np.zeros(0, np.int64)},  # empty
        {"x": np.zeros((4, 8, 8, 3), np.uint8)},  # no labels
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_npz(tmp_path / "bad.npz")
    assert "bad.npz" in _one_line(err)


def test_unreadable_npz_and_labels_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_npz(tmp_path / "missing.npz")
    _one_line(err)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError) as err:
        load_npz(tmp_path / "junk.npz")
    _one_line(err)
    _write_npz(tmp_path / "cut.npz")
    whole = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "cut.npz")
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="not a zip archive of arrays"):
        load_npz(tmp_path / "single.npz")
    (tmp_path / "text.npz").write_text("some text, no zip")
    with pytest.raises(DataError, match="not a zip archive of arrays") as err:
        load_npz(tmp_path / "text.npz")
    assert "pickle" not in _one_line(err)
    x = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 10]))
    np.savez(tmp_path / "test.npz", x=x, y=np.array([0, 1, 2]))
    with pytest.raises(DataError, match="labels span 0..10"):
        load_npz_folder(tmp_path, CIFAR10_CLASSES)
    np.savez(tmp_path / "negative.npz", x=x, y=np.array([-9, -5, -1]))
    with pytest.raises(DataError, match=r"labels span -9..-1; class labels are 0, 1, 2, ...$"):
        load_npz(tmp_path / "negative.npz")
    np.savez(tmp_path / "train.npz", x=np.zeros((3, 16, 16, 3), np.uint8), y=np.array([0, 1, 2]))
    with pytest.raises(DataError, match="same dataset"):
        load_npz_folder(tmp_path)


def test_bad_cifar_pickles(tmp_path: Path) -> None:
    folder, _ = _write_fake_cifar(tmp_path)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_2") as err:
        load_cifar10(folder)
    _one_line(err)

    # A pickle that would run code is refused before anything runs.
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match="refusing"):
        load_cifar10(folder)

    batch = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="3072"):
        load_cifar10(folder)

    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="data_batch_2") as err:
        load_cifar10(folder)
    _one_line(err)


def test_unknown_or_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset") as err:
        load_dataset("imagenet")
    _one_line(err)
    with pytest.raises(DataError, match="download=True") as err:
        load_dataset("cifar10", root=tmp_path)
    _one_line(err)
    with pytest.raises(DataError, match="no train/ image folder"):
        load_dataset(tmp_path)
    # A relative path that is not there says where it was looked for.
    with pytest.raises(DataError, match=r"'../shared/nope': no such file or folder \(relative paths start from the current folder, /") as err:
        load_dataset("../shared/nope")
    _one_line(err)


# ---------------------------------------------------------------------------------------------
# Download


def _fake_tarball(tmp_path: Path, extra: tarfile.TarInfo | None = None) -> bytes:
    src = tmp_path / "src"
    _write_fake_cifar(src)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))
    return buffer.getvalue()


def test_download_offline_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download") as err:
        download_cifar10(tmp_path / "data")
    assert "no route to host" in _one_line(err)
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", root=tmp_path / "data", download=True)


def test_download_checks_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = _fake_tarball(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))
    with pytest.raises(DataError, match="MD5") as err:
        download_cifar10(tmp_path / "data")
    _one_line(err)
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()

    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(blob).hexdigest())
    splits = load_dataset("cifar10", root=tmp_path / "data", download=True, val_size=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py"]
    # Present now: no second download.
    monkeypatch.setattr(urllib.request, "urlopen", None)
    assert download_cifar10(tmp_path / "data") == tmp_path / "data" / "cifar-10-batches-py"


@pytest.mark.parametrize("kind", ["escape", "symlink"])
def test_download_refuses_unsafe_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    member = tarfile.TarInfo("../evil.txt" if kind == "escape" else "cifar-10-batches-py/link")
    if kind == "escape":
        member.size = 4
    else:
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    blob = _fake_tarball(tmp_path, member)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(blob).hexdigest())
    with pytest.raises(DataError, match="unsafe"):
        download_cifar10(tmp_path / "data")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


# ---------------------------------------------------------------------------------------------
# Splits


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])


@pytest.mark.parametrize("size", [0.2, 0.37, 13, 0])
def test_stratified_split(size: float) -> None:
    counts = [50, 31, 7, 12, 100]
    labels = _labels(counts)  # grouped by class, like the CIFAR npz
    n = len(labels)
    keep, held = stratified_indices(labels, size, seed=3)
    expected_total = round(size * n) if isinstance(size, float) else size
    assert len(held) == expected_total and len(keep) == n - expected_total
    # Disjoint and covering.
    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(n))
    held_counts = torch.bincount(labels[held], minlength=len(counts)).double()
    keep_counts = torch.bincount(labels[keep], minlength=len(counts)).double()
    share = torch.tensor(counts).double() * expected_total / n
    assert ((held_counts - share).abs() < 1).all()
    assert ((keep_counts - (torch.tensor(counts) - share)).abs() < 1).all()


def test_split_is_seeded_and_shuffled() -> None:
    labels = _labels([100] * 10)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 3, 2, 2), dtype=torch.uint8, generator=g)
    ds = Dataset(images, labels, tuple("abcdefghij"))
    train_a, val_a = split(ds, 200, seed=0)
    train_b, val_b = split(ds, 200, seed=0)
    _, val_c = split(ds, 200, seed=1)
    assert torch.equal(val_a.labels, val_b.labels) and torch.equal(val_a.images, val_b.images)
    assert torch.equal(train_a.images, train_b.images)
    assert not torch.equal(val_a.images, val_c.images)
    assert torch.bincount(val_a.labels).tolist() == [20] * 10
    # Not grouped by class any more.
    assert (val_a.labels[1:] != val_a.labels[:-1]).sum() > 100
    assert train_a.classes == ds.classes and val_a.mean == ds.mean


@pytest.mark.parametrize("size", [1.0, -0.1, 1000, -1])
def test_split_rejects_bad_sizes(size: float) -> None:
    with pytest.raises(ValueError):
        stratified_indices(_labels([500, 500]), size, seed=0)


# ---------------------------------------------------------------------------------------------
# Augmentation


def _reference(
    images: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    pad: int,
    size: tuple[int, int],
    mode: str,
) -> torch.Tensor:
    """The obvious per-image version: pad, slice, flip."""
    out = []
    for img, (r, c), f in zip(images, offsets.tolist(), flips.tolist()):
        padded = F.pad(img[None].float(), (pad,) * 4, mode="constant" if mode == "zeros" else "reflect")[0]
        piece = padded[:, r : r + size[0], c : c + size[1]]
        out.append(piece.flip(-1) if f else piece)
    return torch.stack(out).to(images.dtype)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize(
    "h,w,pad,crop", [(32, 32, 4, None), (32, 32, 2, 28), (10, 14, 3, 12), (9, 7, 2, None)]
)
def test_augmentation_matches_reference(mode: str, h: int, w: int, pad: int, crop: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, h, w), dtype=torch.uint8, generator=g)
    offsets, flips = draw_augmentation(64, h, w, pad=pad, crop=crop, generator=g)
    assert flips.any() and not flips.all()
    out = apply_augmentation(images, offsets, flips, pad=pad, crop=crop, padding_mode=mode)
    expected = _reference(images, offsets, flips, pad, (h, w) if crop is None else (crop, crop), mode)
    assert out.dtype == torch.uint8 and torch.equal(out, expected)


def test_augment_equals_draw_then_apply() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, pad=4, padding_mode="reflect", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    offsets, flips = draw_augmentation(16, 32, 32, pad=4, generator=g)
    assert torch.equal(out, apply_augmentation(images, offsets, flips, pad=4, padding_mode="reflect"))
    assert not torch.equal(out, images)
    # No crop room and no flip: identity.
    assert torch.equal(augment(images, pad=0, flip=False), images)


def test_flip_probability_and_offset_range() -> None:
    offsets, flips = draw_augmentation(20000, 32, 32, pad=4, generator=torch.Generator().manual_seed(1))
    assert 0.48 < flips.float().mean().item() < 0.52
    assert offsets.min().item() == 0 and offsets.max().item() == 8
    assert set(offsets[:, 0].tolist()) == set(range(9))
    _, none = draw_augmentation(100, 32, 32, flip=False)
    assert not none.any()


def test_augmentation_rejects_bad_settings() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError):
        draw_augmentation(2, 4, 4, pad=0, crop=5)
    with pytest.raises(ValueError):
        augment(images, pad=4, padding_mode="reflect")
    with pytest.raises(ValueError):
        augment(images, pad=1, padding_mode="circular")


# ---------------------------------------------------------------------------------------------
# Normalisation and batching


def test_normalize() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 2, 3).clone()
    mean, std = (0.5, 0.4, 0.2), (0.225, 0.5, 0.25)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    for c in range(3):
        expected = (torch.tensor([0.0, 0.2, 1.0]) - mean[c]) / std[c]
        assert torch.allclose(out[0, c, 0], expected, atol=1e-6)
    cl = normalize(images, PAPER_MEAN, PAPER_STD, channels_last=True, dtype=torch.bfloat16)
    assert cl.dtype == torch.bfloat16 and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl.float(), normalize(images, PAPER_MEAN, PAPER_STD), atol=0.02)


def _toy(n: int = 50) -> Dataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return Dataset(images, torch.arange(n) % 5, tuple("abcde"))


def test_batches_cover_and_shapes() -> None:
    ds = _toy()
    out = list(batches(ds, 16))
    assert len(out) == num_batches(50, 16) == 4 and [len(y) for _, y in out] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([y for _, y in out]), ds.labels)  # unshuffled: in order
    assert torch.allclose(out[0][0], normalize(ds.images[:16], PAPER_MEAN, PAPER_STD))

    out = list(batches(ds, 16, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)))
    assert len(out) == num_batches(50, 16, drop_last=True) == 3
    seen = torch.cat([y for _, y in out])
    assert len(seen) == 48 and not torch.equal(seen, ds.labels[:48])

    plain = {"mean": (0.0,) * 3, "std": (1.0,) * 3}
    x, _ = next(iter(batches(ds, 8, augmentation=Augmentation(pad=2, crop=6), **plain)))
    assert x.shape == (8, 3, 6, 6) and 0 <= x.min() and x.max() <= 1


def test_batches_deterministic_under_seed() -> None:
    ds = _toy()

    def epoch(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        return list(batches(ds, 16, shuffle=True, augmentation=True, generator=g))

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # Shuffled and augmented, the batch is still the augmentation of the rows it names.
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(50, generator=g)
    offsets, flips = draw_augmentation(16, 8, 8, generator=g)
    rows = apply_augmentation(ds.images[order[:16]], offsets, flips)
    assert torch.equal(a[0][1], ds.labels[order[:16]])
    assert torch.allclose(a[0][0], normalize(rows, PAPER_MEAN, PAPER_STD))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_match_cpu() -> None:
    ds = _toy(300)
    kwargs = {"shuffle": True, "augmentation": Augmentation(padding_mode="reflect"), "channels_last": True}
    cpu = list(batches(ds, 64, generator=torch.Generator().manual_seed(0), **kwargs))
    on_device = list(batches(ds.to("cuda"), 64, generator=torch.Generator().manual_seed(0), **kwargs))
    moved = list(batches(ds, 64, device="cuda", generator=torch.Generator().manual_seed(0), **kwargs))
    for (x, y), (xd, yd), (xm, ym) in zip(cpu, on_device, moved):
        assert xd.is_cuda and xm.is_cuda and xd.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, yd.cpu()) and torch.equal(y, ym.cpu())
        assert torch.allclose(x, xd.cpu(), atol=1e-5) and torch.allclose(x, xm.cpu(), atol=1e-5)
