"""Labelled images as uint8 tensors, in memory or streamed, with batched augmentation on any device.

Following airbench (Keller Jordan, cifar10-airbench), every image of a dataset that fits in
memory lives in one ``(N, C, H, W)`` uint8 tensor (:class:`Dataset`); batches are cut by index,
and padding, random crops, resized crops and flips are done for a whole batch at once on the
batch's device, with no per-image Python. An image folder too large for memory is streamed
(:class:`gross.imagefolder.ImageFiles`): worker processes decode the same index batches into the
same uint8 tensors, so that everything downstream (augmentation, normalisation, the training
loops, the search) is the same code on both paths. Both are :class:`ImageSet`.

Sources, all resolved by :func:`load_dataset`:

- ``"digits"`` (default): scikit-learn's 1,797 real 8x8 handwritten digits, embedded in the
  package, upsampled to 32x32 RGB so that CIFAR networks run on them unchanged. It ships no
  test split, so a fixed seeded stratified one is cut here.
- ``"cifar10"``: the official ``cifar-10-batches-py`` pickles, or a folder of ``train.npz`` /
  ``test.npz`` archives; downloaded from the official address only when asked.
- a path to a ``.npz`` archive (``x`` uint8 NHWC, ``y`` integer labels) or to a folder holding
  ``train.npz`` and ``test.npz`` or the CIFAR-10 pickles;
- a path to an image folder, ``train/<class>/<image>`` with optional ``val/`` and ``test/`` of
  the same layout (:mod:`gross.imagefolder`; docs/data.md).

Validation splits are stratified and seeded (:func:`split`); the test set is never split or
used to select anything.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AUTHORS_STD",
    "Augmentation",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DEFAULT_ROOT",
    "AUGMENTS",
    "DataError",
    "Dataset",
    "ImageSet",
    "PAPER_MEAN",
    "PAPER_STD",
    "ResizedCrop",
    "Splits",
    "StreamedBatches",
    "apply_augmentation",
    "augment",
    "batches",
    "center_crop",
    "download_cifar10",
    "draw_augmentation",
    "epoch_order",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_npz",
    "load_npz_folder",
    "normalize",
    "num_batches",
    "resolve_augment",
    "split",
    "stratified_indices",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DIGITS_CLASSES = tuple(str(d) for d in range(10))
# scikit-learn's digits (sklearn.datasets.load_digits: images 0..16 and targets, as uint8),
# shipped in the package so that the default run needs nothing but the core dependencies.
DIGITS_FILE = Path(__file__).with_name("digits.npz")

# The GroSS paper normalises every channel with mean 0.5 and std 0.225; the authors' code
# uses std 0.5. Per-dataset statistics are deliberately not the default, to match the paper.
PAPER_MEAN = (0.5, 0.5, 0.5)
PAPER_STD = (0.225, 0.225, 0.225)
AUTHORS_STD = (0.5, 0.5, 0.5)

DEFAULT_ROOT = Path("data")

# The digits test split is fixed, independent of any experiment seed, so that every run is
# scored on the same held-out images.
_HELD_OUT_FRACTION = 0.2
_HELD_OUT_SEED = 0


class DataError(RuntimeError):
    """A data file is missing, unreadable or malformed; the message says what to do."""


class ImageSet:
    """Labelled uint8 images that batches are cut from by index, in memory or streamed.

    Subclasses: :class:`Dataset` (one tensor in memory) and
    :class:`gross.imagefolder.ImageFiles` (files decoded by worker processes). Code that cuts
    batches uses only what is declared here, so it does not know which path it is on.

    Attributes (of every subclass)
    ------------------------------
    labels : Tensor, shape (N,), int64, on the CPU or the images' device
    classes : tuple of str
    mean, std : tuple of float, length C
    size : tuple of (int, int) or None
        The network's input height and width; stored images larger than it are centre-cropped
        to it for evaluation (:func:`center_crop`) and cropped to it by the training
        augmentation. ``None``: the stored size.
    """

    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int] | None
    in_memory: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the uint8 images :meth:`load` yields."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the network's input: the stored channels at :attr:`size`."""
        c, h, w = self.stored_shape
        return (c, *self.size) if self.size is not None else (c, h, w)

    def subset(self, index: Tensor) -> ImageSet:
        """The rows ``index`` (int64, shape (M,)), in that order."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> ImageSet:
        """A copy whose :meth:`load` cuts from ``device`` (streamed sets decode on the host)."""
        raise NotImplementedError

    def load(self, index_batches: Iterable[Tensor], device: torch.device | str | None = None) -> Iterator[Tensor]:
        """The uint8 images ``(len(index), C, H, W)`` of each index batch, in order, on ``device``.

        The one place images are read: from the tensor in memory, or decoded from files by
        worker processes ahead of use.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Dataset(ImageSet):
    """Labelled images held whole in memory.

    Attributes
    ----------
    images : Tensor, shape (N, C, H, W), uint8
    labels : Tensor, shape (N,), int64
        Class indices in ``[0, len(classes))``.
    classes : tuple of str
        Class names, indexed by label.
    mean, std : tuple of float, length C
        Per-channel normalisation in [0, 1] pixel units, used by :func:`batches`.
    size : tuple of (int, int), optional
        The network's input size when the stored images are larger (see :class:`ImageSet`).
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] = PAPER_MEAN
    std: tuple[float, ...] = PAPER_STD
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be an int64 (N,) tensor with N={len(self.images)}, got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values, one per channel")
        if self.size is not None and not (0 < self.size[0] <= self.images.shape[2] and 0 < self.size[1] <= self.images.shape[3]):
            raise ValueError(f"size {self.size} does not fit in images of {tuple(self.images.shape[2:])}")

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def load(self, index_batches: Iterable[Tensor], device: torch.device | str | None = None) -> Iterator[Tensor]:
        for index in index_batches:
            x = self.images[index.to(self.images.device)]
            yield x if device is None else x.to(device, non_blocking=True)

    def subset(self, index: Tensor) -> Dataset:
        """The rows ``index`` (int64, shape (M,)), in that order."""
        index = index.to(self.images.device)
        return replace(self, images=self.images[index], labels=self.labels[index])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy on ``device``; keep a dataset on the GPU to batch without host transfers."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


@dataclass(frozen=True)
class Splits:
    """Train, validation and test sets of one source; ``val`` is empty when not requested."""

    train: ImageSet
    val: ImageSet
    test: ImageSet


# ---------------------------------------------------------------------------------------------
# Loading


def _dataset_from_numpy(
    x: np.ndarray, y: np.ndarray, classes: Sequence[str] | None, source: str, *, layout: str
) -> Dataset:
    """Check decoded arrays and wrap them; ``layout`` is "NHWC" or "NCHW".

    Without ``classes`` the names are "0", "1", ... up to the largest label.
    """
    if x.dtype != np.uint8:
        raise DataError(f"{source}: images are {x.dtype}, expected uint8 0..255; re-export them as uint8")
    if x.ndim != 4 or x.shape[3 if layout == "NHWC" else 1] not in (1, 3):
        raise DataError(f"{source}: images have shape {x.shape}, expected {layout} with 1 or 3 channels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels are {y.dtype} of shape {y.shape}, expected 1-d integers")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels; the file is inconsistent")
    if len(y) == 0:
        raise DataError(f"{source}: holds no images; re-create or re-copy it")
    if y.min() < 0:
        raise DataError(f"{source}: labels span {y.min()}..{y.max()}; class labels are 0, 1, 2, ...")
    if classes is None:
        classes = tuple(str(k) for k in range(int(y.max()) + 1))
    if y.max() >= len(classes):
        raise DataError(
            f"{source}: labels span {y.min()}..{y.max()}, expected 0..{len(classes) - 1}; "
            f"check the file or the class list"
        )
    images = torch.from_numpy(np.ascontiguousarray(x))
    if layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    # The default statistics are per channel; single-channel sources take the first value.
    c = images.shape[1]
    return Dataset(
        images.contiguous(),
        torch.from_numpy(y.astype(np.int64)),
        tuple(classes),
        PAPER_MEAN[:c],
        PAPER_STD[:c],
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an existing .npz with arrays x and y")
    # Opened here, not by np.load, which leaks its handle when the zip is corrupt.
    with open(path, "rb") as f:
        try:
            if not zipfile.is_zipfile(f):
                # np.load would read it as one .npy array or, failing that, talk of allow_pickle.
                raise ValueError("it is not a zip archive of arrays, as np.savez writes")
            f.seek(0)
            archive = np.load(f, allow_pickle=False)
            missing = sorted({"x", "y"} - set(archive.files))
            if missing:
                raise DataError(
                    f"{path}: no array(s) {missing}; the archive needs x (uint8 NHWC) and y (labels)"
                )
            return archive["x"], archive["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DataError(f"{path}: not a readable .npz archive ({err}); re-create or re-copy it") from err


def load_npz(path: str | Path, classes: Sequence[str] | None = None) -> Dataset:
    """Load one ``.npz`` archive of ``x`` (uint8, (N, H, W, C)) and ``y`` (integers, (N,)).

    Parameters
    ----------
    path : str or Path
    classes : sequence of str, optional
        Class names; by default ``"0"``, ``"1"``, ... up to the largest label.

    Returns
    -------
    Dataset
        ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64.
    """
    path = Path(path)
    x, y = _read_npz(path)
    return _dataset_from_numpy(x, y, classes, str(path), layout="NHWC")


def load_npz_folder(folder: str | Path, classes: Sequence[str] | None = None) -> tuple[Dataset, Dataset]:
    """Load ``train.npz`` and ``test.npz`` from ``folder``.

    Both archives hold ``x`` (uint8, (N, H, W, C)) and ``y`` (integers, (N,)); by default the
    class list is ``"0"``, ``"1"``, ... up to the largest label of either file.

    Returns
    -------
    train, test : Dataset
    """
    folder = Path(folder)
    train, test = (load_npz(folder / f"{part}.npz", classes) for part in ("train", "test"))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{folder}: train images are {tuple(train.images.shape[1:])} but test images are "
            f"{tuple(test.images.shape[1:])}; both archives must come from the same dataset"
        )
    if classes is None:
        # A class may be missing from one file; name every class seen in either.
        names = max(train.classes, test.classes, key=len)
        train, test = replace(train, classes=names), replace(test, classes=names)
    return train, test


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else.

    The official CIFAR-10 batches are Python 2 pickles of dicts of numpy arrays, lists and
    strings; refusing every other global keeps a tampered file from running code.
    """

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol 2 pickles written by Python 3 encode bytes through codecs.encode.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path}: missing; re-extract cifar-10-python.tar.gz or call download_cifar10()"
        )
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    # Corrupt opcodes surface as any of these, depending on where the damage is.
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, pickle.UnpicklingError) as err:
        raise DataError(
            f"{path}: unreadable or truncated ({err!r}); delete {path.parent} and download again"
        ) from err
    if not isinstance(content, dict):
        kind = type(content).__name__
        raise DataError(f"{path}: not a CIFAR-10 batch (a {kind}); delete it and download again")
    return content


def _cifar_batch(path: Path, classes: Sequence[str]) -> Dataset:
    content = _read_cifar_pickle(path)
    if b"data" not in content or b"labels" not in content:
        raise DataError(f"{path}: no data/labels entries; delete {path.parent} and download again")
    data = content[b"data"]
    labels = np.asarray(content[b"labels"])
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: data has shape {shape}, expected (N, 3072); delete it and download again")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return _dataset_from_numpy(data.reshape(-1, 3, 32, 32), labels, classes, str(path), layout="NCHW")


def _cat(parts: Sequence[Dataset]) -> Dataset:
    return replace(
        parts[0],
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
    )


def load_cifar10(root: str | Path) -> tuple[Dataset, Dataset]:
    """Load CIFAR-10 from the official ``cifar-10-batches-py`` pickles.

    Parameters
    ----------
    root : str or Path
        The ``cifar-10-batches-py`` folder, or a folder containing it.

    Returns
    -------
    train : Dataset
        50,000 images (N, 3, 32, 32) uint8 from ``data_batch_1`` .. ``data_batch_5``.
    test : Dataset
        10,000 images from ``test_batch``.
    """
    folder = Path(root)
    if (folder / CIFAR10_FOLDER).is_dir():
        folder = folder / CIFAR10_FOLDER
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder; call download_cifar10() or pass the {CIFAR10_FOLDER} folder"
        )
    classes: Sequence[str] = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        names = _read_cifar_pickle(folder / "batches.meta").get(b"label_names")
        if names is not None:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    train = _cat([_cifar_batch(folder / f"data_batch_{i}", classes) for i in range(1, 6)])
    test = _cifar_batch(folder / "test_batch", classes)
    return train, test


def load_digits(
    test_fraction: float = _HELD_OUT_FRACTION, seed: int = _HELD_OUT_SEED, size: int = 32
) -> tuple[Dataset, Dataset]:
    """scikit-learn's handwritten digits (shipped in the package) as 3-channel uint8 images.

    The 8x8 images (values 0..16) are rescaled to 0..255 and upsampled bilinearly, and the grey
    channel is repeated three times so that networks built for CIFAR-10 run on them unchanged.

    Parameters
    ----------
    test_fraction : float
        Share of each class held out as the test set.
    seed : int
        Seed of the stratified test split; keep the default so every run tests on the same images.
    size : int
        Output height and width.

    Returns
    -------
    train, test : Dataset
        Images (N, 3, size, size) uint8 and labels (N,) int64; 1,797 images in all.
    """
    with np.load(DIGITS_FILE, allow_pickle=False) as digits:
        small, target = digits["images"], digits["labels"]
    grey = torch.from_numpy(small).float().unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    big = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(target.astype(np.int64))
    full = Dataset(images, labels, DIGITS_CLASSES)
    train_idx, test_idx = stratified_indices(labels, test_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: Path, dest: Path) -> None:
    """Extract a tarball, refusing links, devices and members that would land outside ``dest``."""
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest):
                raise DataError(f"{archive}: unsafe member {m.name!r}; delete the file and download again")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12 has no extraction filters; members were checked above.
            tar.extractall(dest, members=members)


def download_cifar10(root: str | Path = DEFAULT_ROOT, *, timeout: float = 60.0) -> Path:
    """Download and extract the official CIFAR-10 python archive into ``root``.

    Nothing is fetched when ``root / "cifar-10-batches-py"`` already exists. The archive is
    checked against its published MD5 before extraction and deleted afterwards.

    Returns
    -------
    Path
        The ``cifar-10-batches-py`` folder.
    """
    root = Path(root)
    folder = root / CIFAR10_FOLDER
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        # URLError and timeouts are OSErrors; a dropped connection mid-body is an HTTPException.
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise DataError(
                f"could not download {CIFAR10_URL} ({reason}); connect to the internet, or put "
                f"{CIFAR10_FOLDER}/ or train.npz and test.npz in {root}"
            ) from err
        if _md5(archive) != CIFAR10_MD5:
            raise DataError(f"{CIFAR10_URL}: downloaded file fails its MD5 check; try again later")
        # Extract beside the final folder, then move it, so an interrupted run leaves no half folder.
        _extract(archive, Path(tmp))
        if not (Path(tmp) / CIFAR10_FOLDER).is_dir():
            raise DataError(f"{CIFAR10_URL}: archive has no {CIFAR10_FOLDER}/ folder; try again later")
        (Path(tmp) / CIFAR10_FOLDER).rename(folder)
    return folder


def _has_npz(folder: Path) -> bool:
    return (folder / "train.npz").is_file() and (folder / "test.npz").is_file()


def _has_pickles(folder: Path) -> bool:
    return (folder / "data_batch_1").is_file()


def _load_folder(folder: Path) -> tuple[Dataset, Dataset]:
    if _has_npz(folder):
        return load_npz_folder(folder)
    if _has_pickles(folder) or _has_pickles(folder / CIFAR10_FOLDER):
        return load_cifar10(folder)
    raise DataError(
        f"{folder}: holds no train/ image folder, train.npz + test.npz or {CIFAR10_FOLDER}/; an image folder is "
        f"DATASET/train/<class>/<image>, with optional val/<class>/ and test/<class>/ (docs/data.md)"
    )


def _stats(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    """Per-channel statistics for ``channels``; one repeated value fits any channel count."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(set(values)) == 1:
        return values[:1] * channels
    raise DataError(f"data.{name} has {len(values)} values but the images have {channels} channel(s); give one per channel")


def _load_cifar10_from(root: Path, download: bool) -> tuple[Dataset, Dataset]:
    # Prefer the original pickles: the known npz copy went through JPEG and differs slightly.
    for folder in (root / CIFAR10_FOLDER, root / "cifar10", root):
        if _has_pickles(folder):
            return load_cifar10(folder)
        if _has_npz(folder):
            return load_npz_folder(folder, CIFAR10_CLASSES)
    if download:
        return load_cifar10(download_cifar10(root))
    raise DataError(
        f"CIFAR-10 not found in {root} (looked for {CIFAR10_FOLDER}/, cifar10/train.npz, train.npz); "
        f"pass download=True, or root= a folder that holds it"
    )


def load_dataset(
    name_or_path: str | Path = "digits",
    *,
    val_size: int | float = 0.2,
    seed: int = 0,
    download: bool = False,
    root: str | Path = DEFAULT_ROOT,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | Sequence[int] | None = None,
    channels: int = 3,
    augment: str = "auto",
    memory_gb: float | None = None,
    cache: str | Path | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Splits:
    """Load a dataset by name or path and cut a stratified validation split from its train set.

    Parameters
    ----------
    name_or_path : str or Path
        ``"digits"``, ``"cifar10"``, a ``.npz`` file or a folder (``train.npz`` + ``test.npz``,
        or the CIFAR-10 pickles). A single ``.npz`` has no test set, so a fixed stratified 20%
        of it is held out as one; pass the folder instead to use its ``test.npz``.
    val_size : int or float
        Validation images taken from train: a count, or a fraction of train (0 for none).
        The default gives CIFAR-10's 40,000 / 10,000.
    seed : int
        Seed of the validation split.
    download : bool
        For ``"cifar10"``: download into ``root`` when it is not there.
    root : str or Path
        Where ``"cifar10"`` is looked for: ``root/cifar-10-batches-py``, ``root/cifar10/*.npz``
        or ``root/*.npz``.
    mean, std : sequence of float, optional
        Per-channel normalisation in [0, 1] units; default :data:`PAPER_MEAN`, :data:`PAPER_STD`.
    image_size, channels, augment, memory_gb, cache, workers, skip_bad, progress, log
        For an image folder (``train/<class>/...``), see
        :func:`gross.imagefolder.load_image_folder`; its ``val/`` folder, when there is one, is
        the validation split and ``val_size`` is not used. Other sources are used at their own
        size: ``image_size``, when given, must be it.

    Returns
    -------
    Splits
    """
    key = str(name_or_path).lower() if isinstance(name_or_path, str) else None
    if key not in ("digits", "cifar10", "cifar-10") and Path(name_or_path).is_dir() and (Path(name_or_path) / "train").is_dir():
        from .imagefolder import load_image_folder

        train, val, test = load_image_folder(
            name_or_path, image_size=image_size, channels=channels, augment=augment, memory_gb=memory_gb, cache=cache,
            workers=workers, skip_bad=skip_bad, mean=mean, std=std, progress=progress, log=log,
        )
        if val is None:
            train, val = split(train, val_size, seed)
        return Splits(train, val, test)
    if key == "digits":
        train, test = load_digits()
    elif key in ("cifar10", "cifar-10"):
        train, test = _load_cifar10_from(Path(root), download)
    else:
        path = Path(name_or_path)
        if path.is_dir():
            train, test = _load_folder(path)
        elif path.suffix == ".npz":
            full = load_npz(path)
            keep, held = stratified_indices(full.labels, _HELD_OUT_FRACTION, _HELD_OUT_SEED)
            train, test = full.subset(keep), full.subset(held)
        elif not path.exists() and (path.suffix or len(path.parts) > 1):
            where = "" if path.is_absolute() else f" (relative paths start from the current folder, {Path.cwd()})"
            raise DataError(f"dataset {str(name_or_path)!r}: no such file or folder{where}")
        else:
            raise DataError(
                f"unknown dataset {str(name_or_path)!r}: use 'digits', 'cifar10', or a path to "
                f"an existing .npz file or folder"
            )
    wanted = None if image_size is None else (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if wanted is not None and tuple(train.images.shape[2:]) != wanted:
        raise DataError(
            f"data.image_size {image_size} but {name_or_path} holds {train.images.shape[2]}x{train.images.shape[3]} images; "
            f"image_size resizes image folders only: leave it unset (null) for this dataset"
        )
    c = train.images.shape[1]
    stats = {
        "mean": _stats(train.mean if mean is None else mean, c, "mean"),
        "std": _stats(train.std if std is None else std, c, "std"),
    }
    train, test = replace(train, **stats), replace(test, **stats)
    train, val = split(train, val_size, seed)
    return Splits(train, val, test)


# ---------------------------------------------------------------------------------------------
# Splitting


def stratified_indices(labels: Tensor, size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified partition of ``range(len(labels))`` into a kept and a held-out part.

    Each class gives the held-out part its proportional share of ``size``; the leftover
    images from rounding go to the classes with the largest remainders, so per-class counts
    are within one of exact proportionality and the total is exactly ``size``.

    Parameters
    ----------
    labels : Tensor, shape (N,), int64
    size : int or float
        Held-out count, or fraction of N in [0, 1).
    seed : int

    Returns
    -------
    keep, held : Tensor, int64, shapes (N - size,) and (size,)
        Disjoint row indices covering ``range(N)``, each in a seeded random order.
    """
    labels = labels.cpu()
    n = len(labels)
    if isinstance(size, float) and not 0 <= size < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {size}")
    count = round(size * n) if isinstance(size, float) else size
    if not 0 <= count < n:
        raise ValueError(f"held-out count must be in [0, {n}) to leave images to keep, got {count}")
    gen = torch.Generator().manual_seed(seed)
    classes, per_class = labels.unique(return_counts=True)
    exact = per_class.double() * count / n
    take = exact.floor().long()
    # Largest remainders first; ties go to the lower class index so the split is reproducible.
    order = torch.argsort(exact - take, descending=True, stable=True)
    take[order[: count - int(take.sum())]] += 1
    keep, held = [], []
    for c, t in zip(classes.tolist(), take.tolist()):
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        held.append(rows[:t])
        keep.append(rows[t:])
    # Shuffle across classes so that neither part is grouped by class.
    keep_t, held_t = torch.cat(keep), torch.cat(held)
    keep_t = keep_t[torch.randperm(len(keep_t), generator=gen)]
    held_t = held_t[torch.randperm(len(held_t), generator=gen)]
    return keep_t, held_t


def split(dataset: ImageSet, val_size: int | float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Seeded stratified train / validation split of ``dataset`` (in memory or streamed).

    Parameters
    ----------
    dataset : ImageSet
        A training set; never pass the test set.
    val_size : int or float
        Validation images: a count, or a fraction of ``len(dataset)`` in [0, 1).
    seed : int

    Returns
    -------
    train, val : Dataset
        Disjoint, together all of ``dataset``; both in a seeded random order.
    """
    keep, held = stratified_indices(dataset.labels, val_size, seed)
    return dataset.subset(keep), dataset.subset(held)


# ---------------------------------------------------------------------------------------------
# Augmentation and batching


@dataclass(frozen=True)
class Augmentation:
    """Random crop of a padded image, then a horizontal flip with probability 0.5.

    Attributes
    ----------
    pad : int
        Pixels added on each side before cropping.
    crop : int or None
        Output height and width; ``None`` keeps the input size (the usual CIFAR translation).
    flip : bool
        Flip each image left-right with probability 0.5.
    padding_mode : {"zeros", "reflect"}
        Zeros as in the common ``RandomCrop(32, padding=4)`` recipe; reflect as in airbench.
    """

    pad: int = 4
    crop: int | None = None
    flip: bool = True
    padding_mode: str = "zeros"

    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Offsets and flips of ``n`` images (:func:`draw_augmentation`)."""
        return draw_augmentation(n, height, width, pad=self.pad, crop=self.crop, flip=self.flip, generator=generator)

    def apply(self, images: Tensor, drawn: tuple[Tensor, ...], size: tuple[int, int] | None = None) -> Tensor:
        """``images`` augmented as drawn, then centre-cropped to ``size`` if that is smaller."""
        out = apply_augmentation(images, *drawn, pad=self.pad, crop=self.crop, padding_mode=self.padding_mode)
        return center_crop(out, size)


@dataclass(frozen=True)
class ResizedCrop:
    """Random resized crop and horizontal flip: the ImageNet training augmentation.

    Each image is cropped to a box of ``scale`` times its area and aspect ratio (width / height)
    log-uniform in ``ratio``, at a uniform position, and the box is resized to the output size
    (bilinear); as torchvision's ``RandomResizedCrop``, ten boxes are tried per image and the
    first that fits is taken, else the centred box of the closest allowed ratio. Done for a
    whole batch in one ``grid_sample`` (the box's sampling grid), so it runs on the GPU as well;
    a reduction by more than 2x is not anti-aliased.

    Attributes
    ----------
    scale : (float, float)
        Range of the box's area as a fraction of the image's.
    ratio : (float, float)
        Range of the box's aspect ratio.
    flip : bool
        Flip each image left-right with probability 0.5.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    _ATTEMPTS = 10

    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Boxes ``(n, 4)`` float64 (top, left, height, width in pixels) and flips ``(n,)`` bool.

        Always the same number of draws from ``generator`` per batch, whichever boxes fit, so
        that what follows in the stream does not depend on the image size.
        """
        device = _draw_device(generator)
        k = self._ATTEMPTS
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(n, k, generator=generator, device=device, dtype=torch.float64))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * torch.rand(n, k, generator=generator, device=device, dtype=torch.float64))
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
        # The fallback: the whole image, or its centre at the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = float(width), float(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = float(round(height * self.ratio[1])), float(height)
        else:
            fw, fh = float(width), float(height)
        first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((n,), k, device=device))
        pick = first.clamp(max=k - 1)[:, None]
        found = first < k
        bh = torch.where(found, h.gather(1, pick)[:, 0], torch.full((n,), fh, dtype=torch.float64, device=device))
        bw = torch.where(found, w.gather(1, pick)[:, 0], torch.full((n,), fw, dtype=torch.float64, device=device))
        u = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
        top = torch.where(found, (u[:, 0] * (height - bh + 1)).floor(), ((height - bh) / 2).floor())
        left = torch.where(found, (u[:, 1] * (width - bw + 1)).floor(), ((width - bw) / 2).floor())
        if self.flip:
            flips = torch.rand(n, generator=generator, device=device) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool, device=device)
        return torch.stack([top, left, bh, bw], dim=1), flips

    def apply(self, images: Tensor, drawn: tuple[Tensor, ...], size: tuple[int, int] | None = None) -> Tensor:
        """Crop each image to its box, resize it to ``size`` (default the input's) and flip it."""
        boxes, flips = drawn
        n, _, h, w = images.shape
        oh, ow = size if size is not None else (h, w)
        boxes = boxes.to(images.device, torch.float32)
        top, left, bh, bw = boxes.unbind(1)
        # The affine map from output to input in grid_sample's [-1, 1] units (align_corners=False):
        # the box's centre and half-extent; a flip reads the box's columns right to left.
        sx = bw / w * torch.where(flips.to(images.device), -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=images.device)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = (2 * left + bw) / w - 1
        theta[:, 1, 1] = bh / h
        theta[:, 1, 2] = (2 * top + bh) / h - 1
        grid = F.affine_grid(theta, [n, images.shape[1], oh, ow], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.round_().clamp_(0, 255).to(images.dtype) if images.dtype == torch.uint8 else out.to(images.dtype)


# The training augmentations data.augment names; "auto" is resolved by resolve_augment.
AUGMENTS = ("auto", "pad_crop", "random_resized_crop", "none")
# From this shorter side up, "auto" treats images as photographs (ImageNet-like: a random
# resized crop) rather than thumbnails (CIFAR-like: a few pixels' translation).
AUTO_RESIZED_CROP_FROM = 128


def resolve_augment(kind: str, size: Sequence[int]) -> str:
    """``kind``, or for ``"auto"``: ``"random_resized_crop"`` for images of 128 px and more, else ``"pad_crop"``."""
    if kind not in AUGMENTS:
        raise ValueError(f"data.augment: expected one of {', '.join(AUGMENTS)}, got {kind!r}")
    if kind == "auto":
        return "random_resized_crop" if min(size) >= AUTO_RESIZED_CROP_FROM else "pad_crop"
    return kind


def center_crop(images: Tensor, size: Sequence[int] | None) -> Tensor:
    """The central ``size`` (height, width) of a batch ``(N, C, H, W)``; the batch itself if it has that size."""
    if size is None:
        return images
    h, w = images.shape[-2:]
    th, tw = size
    if (th, tw) == (h, w):
        return images
    if th > h or tw > w:
        raise ValueError(f"cannot centre-crop {th}x{tw} from {h}x{w} images")
    top, left = (h - th) // 2, (w - tw) // 2
    return images[..., top : top + th, left : left + tw]


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def draw_augmentation(
    n: int,
    height: int,
    width: int,
    *,
    pad: int = 4,
    crop: int | None = None,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw crop offsets and flip flags for ``n`` images of ``height`` x ``width``.

    Returns
    -------
    offsets : Tensor, shape (n, 2), int64
        Top-left corner (row, column) of each crop in the padded image.
    flips : Tensor, shape (n,), bool
        Which images to flip left-right; all False when ``flip`` is off.

    Both lie on the generator's device (CPU without one), so that a seed gives the same
    augmentation whichever device the images are on.
    """
    ch, cw = (height, width) if crop is None else (crop, crop)
    span_h, span_w = height + 2 * pad - ch, width + 2 * pad - cw
    if pad < 0 or span_h < 0 or span_w < 0:
        raise ValueError(f"cannot crop {ch}x{cw} from {height}x{width} padded by {pad}")
    device = _draw_device(generator)
    rows = torch.randint(span_h + 1, (n,), generator=generator, device=device)
    cols = torch.randint(span_w + 1, (n,), generator=generator, device=device)
    if flip:
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return torch.stack([rows, cols], dim=1), flips


def _source_index(start: Tensor, length: int, pad: int, size: int, mode: str) -> tuple[Tensor, Tensor]:
    """Map padded coordinates ``start + arange(length)`` back into ``[0, size)``.

    Returns the (n, length) source indices and a mask of those that fall on real pixels;
    under reflection the outside ones are mirrored back, under zeros they are clamped.
    """
    idx = start[:, None] + torch.arange(length, device=start.device) - pad
    inside = (idx >= 0) & (idx < size)
    if mode == "reflect":
        idx = idx.abs()
        return torch.where(idx >= size, 2 * (size - 1) - idx, idx), inside
    return idx.clamp(0, size - 1), inside


def apply_augmentation(
    images: Tensor,
    offsets: Tensor,
    flips: Tensor,
    *,
    pad: int = 4,
    crop: int | None = None,
    padding_mode: str = "zeros",
) -> Tensor:
    """Pad, crop and flip a batch with given offsets and flips, in one gather.

    The padded image is never built: each output pixel's source pixel is computed by index
    arithmetic, and padding pixels are either reflected back inside or zeroed.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W)
        Any dtype, any device.
    offsets : Tensor, shape (N, 2), int64
        Crop corners in the padded image, from :func:`draw_augmentation`.
    flips : Tensor, shape (N,), bool
    pad, crop, padding_mode
        As in :class:`Augmentation`.

    Returns
    -------
    Tensor, shape (N, C, crop, crop), dtype of ``images``
    """
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    n, _, h, w = images.shape
    ch, cw = (h, w) if crop is None else (crop, crop)
    if padding_mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding {pad} needs images larger than {pad} pixels, got {h}x{w}")
    offsets, flips = offsets.to(images.device), flips.to(images.device)
    rows, row_in = _source_index(offsets[:, 0], ch, pad, h, padding_mode)
    cols, col_in = _source_index(offsets[:, 1], cw, pad, w, padding_mode)
    # Flipping the crop is reading its columns right to left.
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    col_in = torch.where(flips[:, None], col_in.flip(1), col_in)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, ch, cw, C)
    if padding_mode == "zeros":
        inside = (row_in[:, :, None] & col_in[:, None, :])[..., None]
        out = torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.permute(0, 3, 1, 2).contiguous()


def augment(
    images: Tensor,
    *,
    pad: int = 4,
    crop: int | None = None,
    flip: bool = True,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random crop of the padded batch and random horizontal flip, per image, batched.

    Equivalent to :func:`draw_augmentation` followed by :func:`apply_augmentation`.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W)
        Usually uint8, on any device.

    Returns
    -------
    Tensor, shape (N, C, crop, crop), dtype of ``images``
    """
    n, _, h, w = images.shape
    offsets, flips = draw_augmentation(n, h, w, pad=pad, crop=crop, flip=flip, generator=generator)
    return apply_augmentation(images, offsets, flips, pad=pad, crop=crop, padding_mode=padding_mode)


def normalize(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Tensor:
    """Map uint8 pixels to ``(x / 255 - mean) / std`` per channel.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W), uint8
    mean, std : sequence of float, length C
        In [0, 1] pixel units.
    dtype : torch.dtype
        Output floating dtype.
    channels_last : bool
        Return in ``torch.channels_last`` memory format, which convolutions prefer on GPUs.

    Returns
    -------
    Tensor, shape (N, C, H, W), ``dtype``
    """
    shape = (1, -1, 1, 1)
    # Fold 1/255 into the scale so that the batch is touched by a single multiply-add.
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
    out = torch.addcmul(-m / s, images.float(), 1.0 / (255.0 * s)).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches :func:`batches` yields for ``n`` images."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    dataset: ImageSet,
    batch_size: int,
    *,
    shuffle: bool = False,
    augmentation: Augmentation | ResizedCrop | bool | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of normalised, optionally shuffled and augmented batches.

    Rows are cut from the uint8 images (:meth:`ImageSet.load`), moved to ``device``, then
    augmented and normalised there; put an in-memory dataset on the GPU first
    (:meth:`Dataset.to`) to skip host transfers. Without augmentation, images larger than the
    dataset's :attr:`~ImageSet.size` are centre-cropped to it.

    Parameters
    ----------
    dataset : ImageSet
        In memory or streamed; the same seed gives the same batches on both.
    batch_size : int
    shuffle : bool
        Visit rows in a random order drawn from ``generator``.
    augmentation : Augmentation, ResizedCrop, bool or None
        ``True`` for the default :class:`Augmentation`; ``None``/``False`` for none.
    generator : torch.Generator, optional
        Source of all randomness; a seeded one makes the epoch reproducible on any device.
    device : torch.device or str, optional
        Where batches go; default the dataset's device.
    drop_last : bool
        Skip a final batch smaller than ``batch_size``.
    mean, std : sequence of float, optional
        Override ``dataset.mean`` and ``dataset.std``.
    dtype, channels_last
        As in :func:`normalize`.

    Yields
    ------
    images : Tensor, shape (B, C, h, w), ``dtype``
    labels : Tensor, shape (B,), int64
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    aug = Augmentation() if augmentation is True else augmentation or None
    if device is None:
        device = dataset.images.device if isinstance(dataset, Dataset) else torch.device("cpu")
    device = torch.device(device)
    mean = dataset.mean if mean is None else mean
    std = dataset.std if std is None else std
    order = epoch_order(len(dataset), shuffle, generator)
    index_batches = [order[b * batch_size : (b + 1) * batch_size] for b in range(num_batches(len(dataset), batch_size, drop_last))]
    _, h, w = dataset.stored_shape
    for index, x in zip(index_batches, dataset.load(index_batches, device)):
        y = dataset.labels[index.to(dataset.labels.device)].to(device, non_blocking=True)
        # Drawn batch by batch, after the permutation: the order the training loop draws in.
        x = aug.apply(x, aug.draw(len(index), h, w, generator), dataset.size) if aug is not None else center_crop(x, dataset.size)
        yield normalize(x, mean, std, dtype=dtype, channels_last=channels_last), y


class StreamedBatches(Sequence):
    """The evaluation batches of a streamed set as a sequence: every pass decodes them again.

    What :func:`gross.train.prepare_batches` gives for a dataset that is not in memory, so that
    the evaluation and search code, which iterate over batches many times, take either.
    """

    def __init__(self, dataset: ImageSet, batch_size: int, device: torch.device | str | None = None, channels_last: bool = False) -> None:
        self.dataset, self.batch_size, self.channels_last = dataset, batch_size, channels_last
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(self.dataset, self.batch_size, device=self.device, channels_last=self.channels_last)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        rows = torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(self.dataset)))
        return next(batches(self.dataset.subset(rows), self.batch_size, device=self.device, channels_last=self.channels_last))


def epoch_order(n: int, shuffle: bool, generator: torch.Generator | None) -> Tensor:
    """The rows of one epoch: a permutation drawn from ``generator`` (on its device), or ``0..n-1``.

    On the CPU whatever the images' device, so that one seed orders both paths alike.
    """
    if shuffle:
        return torch.randperm(n, generator=generator, device=_draw_device(generator)).cpu()
    return torch.arange(n)
