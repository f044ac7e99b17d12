"""Image folders: a user's own images, decoded into memory once or streamed from disk.

The layout is the one timm, torchvision's ``ImageFolder`` and most training code read::

    DATASET/
      train/<class>/<image>     required; the classes are train's subfolders, sorted
      val/<class>/<image>       optional; without it a seeded stratified split of train
      test/<class>/<image>      optional; without it the test split is empty

Every image is decoded by one function (:class:`Decode`): Pillow opens it, converts it to RGB or
grayscale, and, when the images do not all have the network's input size already, resizes it
to cover ``image_size / 0.875`` (the ImageNet evaluation convention) and crops its centre. The
result is a uint8 ``(C, H, W)`` tensor, the same on both paths:

- **in memory** when the decoded folder fits in ``memory_gb``: decoded once into one tensor per
  split (:class:`gross.data.Dataset`, today's fast path) and cached on disk, keyed by the files'
  names, sizes and modification times, so that a rerun skips decoding;
- **streamed** otherwise (:class:`ImageFiles`): each batch of indices is decoded by ``workers``
  processes of a ``DataLoader`` ahead of use.

Because both paths decode the same files with the same function and cut batches from the same
seeded index lists, a seed gives the same batches on both. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .data import PAPER_MEAN, PAPER_STD, DataError, Dataset, ImageSet, _stats, resolve_augment

__all__ = [
    "SPLITS",
    "EVAL_CROP",
    "Decode",
    "ImageFiles",
    "Listing",
    "decode_images",
    "is_image_folder",
    "list_image_folder",
    "load_image_folder",
    "memory_budget",
]

SPLITS = ("train", "val", "test")
# Evaluation resizes the shorter side to image_size / 0.875 and crops the centre (224 of 256).
EVAL_CROP = 0.875
# Bump when decoding changes, so that caches written by an older version are not read.
_DECODE_VERSION = 1
_LAYOUT = "an image folder is DATASET/train/<class>/<image> (required), with optional val/<class>/ and test/<class>/"

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _image_suffixes() -> frozenset[str]:
    """File endings of every format Pillow can open (not the write-only ones)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_folder(folder: Path) -> bool:
    """Whether ``folder`` has a ``train/`` subfolder (the image-folder layout)."""
    return (folder / "train").is_dir()


def memory_budget(memory_gb: float | None) -> int:
    """Bytes of decoded images kept in memory: ``memory_gb`` GiB, or a quarter of the machine's memory."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


# ---------------------------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class Listing:
    """The images of a folder, split by split, in a fixed order (class, then path).

    Attributes
    ----------
    root : Path
    classes : tuple of str
        train's class folders, sorted; a label is an index into it.
    files : dict of str to list of str
        Paths relative to ``root`` of each split present (``"train"``, and ``"val"``/``"test"``
        when those folders exist).
    labels : dict of str to ndarray of int64
    ignored : int
        Files that are not images by their ending (and hidden files), skipped.
    key : str
        SHA-256 of every image's path, size and modification time: changes when the folder does.
    """

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    ignored: int
    key: str


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def list_image_folder(root: str | Path) -> Listing:
    """List ``root/{train,val,test}/<class>/...`` (subfolders of a class folder included).

    Raises
    ------
    DataError
        No ``train/``, a ``train/`` without class folders, an empty class folder, a class in
        ``val/`` or ``test/`` that ``train/`` lacks: one line saying what layout is expected.
    """
    root = Path(root)
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder; {_LAYOUT}")
    suffixes = _image_suffixes()
    classes = tuple(_class_folders(root / "train"))
    if not classes:
        loose = sum(1 for e in os.scandir(root / "train") if e.is_file())
        raise DataError(
            f"{root / 'train'}: no class folders ({loose} loose files); put each class's images in "
            f"train/<class>/, e.g. train/cat/0001.png; {_LAYOUT}"
        )
    digest = hashlib.sha256()
    files: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray] = {}
    ignored = 0
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        names = _class_folders(split_dir)
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(
                f"{split_dir / unknown[0]}: class {unknown[0]!r} is not in train/ (train's classes: "
                f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); every class of {split}/ needs a train/ folder"
            )
        if not names:
            raise DataError(f"{split_dir}: no class folders; {_LAYOUT}")
        paths, ys = [], []
        for name in names:
            found = []
            for dirpath, dirnames, filenames in os.walk(split_dir / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if f.startswith(".") or Path(f).suffix.lower() not in suffixes:
                        ignored += 1
                        continue
                    full = os.path.join(dirpath, f)
                    st = os.stat(full)
                    rel = os.path.relpath(full, root)
                    digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                    found.append(rel)
            if not found:
                raise DataError(
                    f"{split_dir / name}: holds no images (readable endings: .png, .jpg, .jpeg, .bmp, .webp, .tif, ...); "
                    f"every class folder needs at least one; {_LAYOUT}"
                )
            paths += found
            ys += [classes.index(name)] * len(found)
        files[split] = paths
        labels[split] = np.asarray(ys, dtype=np.int64)
    return Listing(root, classes, files, labels, ignored, digest.hexdigest())


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class Decode:
    """How one image file becomes a uint8 ``(C, H, W)`` tensor; picklable, for worker processes.

    Attributes
    ----------
    channels : int
        3 (RGB) or 1 (grayscale); other modes are converted (an alpha channel is dropped).
    stored : (int, int) or None
        Height and width of the result; ``None`` keeps each image's own size.
    cover : (int, int) or None
        Resize the image to cover this box, then crop the centre of size ``stored``; ``None``:
        the image must already have the size ``stored``.
    """

    channels: int = 3
    stored: tuple[int, int] | None = None
    cover: tuple[int, int] | None = None

    def __call__(self, path: str) -> np.ndarray:
        """The image at ``path`` as a uint8 ``(H, W, C)`` array; raises on unreadable files."""
        from PIL import Image

        mode = "RGB" if self.channels == 3 else "L"
        with Image.open(path) as img:
            if self.cover is not None:
                ch, cw = self.cover
                scale = max(ch / img.height, cw / img.width)
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly; draft keeps at least the
                # resolution the resize needs, so only work that would be thrown away is skipped.
                img.draft(mode, (int(img.width * scale + 1), int(img.height * scale + 1)))
                img = img.convert(mode) if img.mode != mode else img
                scale = max(ch / img.height, cw / img.width)
                sh, sw = self.stored
                bh, bw = sh / scale, sw / scale
                box = ((img.width - bw) / 2, (img.height - bh) / 2, (img.width + bw) / 2, (img.height + bh) / 2)
                img = img.resize((sw, sh), Image.Resampling.BILINEAR, box=box)
            else:
                img = img.convert(mode) if img.mode != mode else img  # convert copies even when nothing changes
                if self.stored is not None and (img.height, img.width) != tuple(self.stored):
                    raise ValueError(f"is {img.height}x{img.width}, not {self.stored[0]}x{self.stored[1]} like the others")
            out = np.asarray(img, dtype=np.uint8)
        return out[:, :, None] if out.ndim == 2 else out


def _read_size(path: str) -> tuple[int, int]:
    """Height and width from the file's header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as img:
        return img.height, img.width


class _Files(torch.utils.data.Dataset):
    """``fn(path)`` of each file, or the error it raised as text, so a worker never raises."""

    def __init__(self, paths: Sequence[str], fn: Callable[[str], object]) -> None:
        self.paths = paths
        self.fn = fn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, object, str | None]:
        try:
            return i, self.fn(str(self.paths[i])), None
        except Exception as err:  # a file is bad in any of many ways; the caller names it
            return i, None, f"{type(err).__name__}: {err}".replace("\n", " ")


def _collate_images(items: list[tuple[int, object, str | None]]) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    """Stack decoded images (in the worker, so the main process receives one shared tensor)."""
    errors = [(i, err) for i, _, err in items if err is not None]
    good = [x for _, x, err in items if err is None]
    stacked = torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).contiguous() if good else None
    return [i for i, _, _ in items], stacked, errors


def _collate_list(items: list) -> list:
    return items


def _loader(paths: Sequence[str], fn: Callable, index_batches: list[list[int]], workers: int, collate: Callable, pin: bool = False) -> torch.utils.data.DataLoader:
    # Its own generator: the loader draws its workers' seed from it, which would otherwise be
    # taken from torch's global one and shift dropout's draws between the two paths.
    return torch.utils.data.DataLoader(
        _Files(paths, fn), batch_sampler=index_batches, num_workers=workers, collate_fn=collate, pin_memory=pin,
        prefetch_factor=4 if workers else None, generator=torch.Generator(),
    )


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _bad_file(root: Path, path: str, err: str) -> DataError:
    return DataError(
        f"{root / path}: not a readable image ({err}); delete or replace it, or set data.skip_bad: true to skip unreadable files"
    )


def decode_images(
    paths: Sequence[str],
    decode: Decode,
    *,
    workers: int = 0,
    skip_bad: bool = False,
    root: Path = Path("."),
    progress: bool = False,
    desc: str = "decode",
) -> tuple[Tensor, np.ndarray]:
    """Decode every file into one uint8 ``(N, C, H, W)`` tensor, with ``workers`` processes.

    Returns the tensor and a boolean mask of the files kept (all, unless ``skip_bad``).
    """
    c, (h, w) = decode.channels, decode.stored
    out = torch.empty((len(paths), c, h, w), dtype=torch.uint8)
    ok = np.ones(len(paths), dtype=bool)
    loader = _loader([str(root / p) for p in paths], decode, _chunks(len(paths), 64), workers, _collate_images)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for index, x, errors in loader:
            for i, err in errors:
                if not skip_bad:
                    raise _bad_file(root, paths[i], err)
                ok[i] = False
            good = [i for i in index if ok[i]]
            if good:
                out[good] = x
            bar.update(len(index))
    return out[torch.from_numpy(ok)] if not ok.all() else out, ok


# ---------------------------------------------------------------------------------------------
# The streamed split


@dataclass(frozen=True)
class ImageFiles(ImageSet):
    """Labelled image files decoded batch by batch by a ``DataLoader``'s worker processes.

    The streamed counterpart of :class:`gross.data.Dataset`: :meth:`load` yields the same uint8
    tensors for the same index batches, decoded by :class:`Decode` in ``workers`` processes
    ahead of use (``workers=0``: in this process).

    Attributes
    ----------
    root : Path
    paths : ndarray of str
        Relative to ``root``.
    labels : Tensor, shape (N,), int64
    classes, mean, std, size
        As in :class:`gross.data.ImageSet`.
    decode : Decode
    workers : int
    """

    root: Path
    paths: np.ndarray
    labels: Tensor
    classes: tuple[str, ...]
    decode: Decode
    mean: tuple[float, ...] = PAPER_MEAN
    std: tuple[float, ...] = PAPER_STD
    size: tuple[int, int] | None = None
    workers: int = 0

    in_memory = False

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        return (self.decode.channels, *self.decode.stored)

    def subset(self, index: Tensor) -> ImageFiles:
        index = index.cpu()
        return replace(self, paths=self.paths[index.numpy()], labels=self.labels[index])

    def to(self, device: torch.device | str) -> ImageFiles:
        return self  # decoded on the host; load() moves each batch

    def load(self, index_batches: Iterable[Tensor], device: torch.device | str | None = None) -> Iterator[Tensor]:
        device = torch.device("cpu") if device is None else torch.device(device)
        lists = [index.cpu().tolist() for index in index_batches]
        paths = [str(self.root / p) for p in self.paths]
        loader = _loader(paths, self.decode, lists, self.workers, _collate_images, pin=device.type == "cuda")
        for _index, x, errors in loader:
            if errors:
                i, err = errors[0]
                raise DataError(
                    f"{self.root / self.paths[i]}: not a readable image ({err}); delete or replace it "
                    f"(a streamed folder cannot skip a file whose pixels are damaged past its header, data.skip_bad notwithstanding)"
                )
            yield x.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Loading a folder


def _scan(listing: Listing, workers: int, cache: Path | None, progress: bool) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
    """Every image's (height, width) from its header, and the files whose header is unreadable.

    Cached under ``cache`` by the listing's key: a large folder is scanned once.
    """
    where = cache / f"{listing.key[:32]}.sizes.npz" if cache is not None else None
    if where is not None and where.is_file():
        with np.load(where, allow_pickle=False) as saved:
            out = {}
            for split in listing.files:
                bad = json.loads(str(saved[f"{split}_bad"]))
                out[split] = (saved[f"{split}_sizes"], {int(k): v for k, v in bad.items()})
            return out
    out = {}
    for split, paths in listing.files.items():
        sizes = np.zeros((len(paths), 2), dtype=np.int64)
        bad: dict[int, str] = {}
        loader = _loader([str(listing.root / p) for p in paths], _read_size, _chunks(len(paths), 256), workers, _collate_list)
        with tqdm(total=len(paths), desc=f"scan {split}", unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
            for items in loader:
                for i, hw, err in items:
                    if err is not None:
                        bad[i] = err
                    else:
                        sizes[i] = hw
                bar.update(len(items))
        out[split] = (sizes, bad)
    if where is not None:
        arrays = {}
        for split, (sizes, bad) in out.items():
            arrays[f"{split}_sizes"] = sizes
            arrays[f"{split}_bad"] = np.asarray(json.dumps(bad))
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        _atomic_save(where, write)
    return out


def _atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then rename it: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise DataError(f"data.image_size: expected a positive int or [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_image_folder(
    root: str | Path,
    *,
    image_size: int | Sequence[int] | None = None,
    channels: int = 3,
    augment: str = "auto",
    memory_gb: float | None = None,
    cache: str | Path | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: bool = True,
    log: Log | None = _stderr,
) -> tuple[ImageSet, ImageSet | None, ImageSet]:
    """Train, validation and test sets of an image folder, in memory or streamed.

    Parameters
    ----------
    root : str or Path
        The folder holding ``train/`` (and optionally ``val/``, ``test/``).
    image_size : int or (int, int), optional
        The network's input size; default the images' own size, which they must then share.
    channels : {3, 1}
        RGB or grayscale.
    augment : str
        The training augmentation (see :func:`gross.data.resolve_augment`); a random resized
        crop keeps a margin: images are stored at ``image_size / 0.875`` for it to crop from.
    memory_gb : float, optional
        Keep the decoded images in memory when they fit in this many GiB (default a quarter of
        the machine's memory); 0 always streams.
    cache : str or Path, optional
        Folder of decoded in-memory folders (and header scans), keyed by the files' names, sizes
        and modification times; ``None``: decode every time.
    workers : int, optional
        Decoding processes; default the CPUs available to this process, at most 8.
    skip_bad : bool
        Skip unreadable images (counted in the log) instead of stopping at the first.
    mean, std : sequence of float, optional
        Normalisation; default :data:`gross.data.PAPER_MEAN` / ``PAPER_STD``.
    progress : bool
        Progress bars while scanning and decoding.
    log : callable, optional
        Receives one line per fact worth knowing (counts, the path taken, the cache).

    Returns
    -------
    train, val, test : ImageSet
        ``val`` is ``None`` when there is no ``val/`` folder (the caller splits train); ``test``
        is empty when there is no ``test/`` folder.
    """
    log = log or (lambda message: None)
    rank, world = _world()
    progress = progress and rank == 0
    say = log if rank == 0 else (lambda message: None)
    if channels not in (1, 3):
        raise DataError(f"data.channels: expected 3 (RGB) or 1 (grayscale), got {channels}")
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    root = Path(root)
    cache_dir = Path(cache) if cache is not None else None
    listing = list_image_folder(root)
    scanned = _scan(listing, workers, cache_dir, progress)

    # Unreadable headers: stop at the first, or drop them all.
    skipped = 0
    files, labels, sizes = {}, {}, {}
    for split, paths in listing.files.items():
        split_sizes, bad = scanned[split]
        if bad and not skip_bad:
            i = min(bad)
            raise _bad_file(root, paths[i], bad[i])
        keep = np.ones(len(paths), dtype=bool)
        keep[list(bad)] = False
        skipped += len(bad)
        files[split] = np.asarray(paths, dtype=object)[keep]
        labels[split] = listing.labels[split][keep]
        sizes[split] = split_sizes[keep]
        if not keep.any():
            raise DataError(f"{root / split}: none of its images is readable; {_LAYOUT}")
    every = np.concatenate(list(sizes.values()))
    distinct = np.unique(every, axis=0)
    if image_size is None:
        if len(distinct) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in distinct[:4])
            raise DataError(
                f"{root}: the images have {len(distinct)} different sizes ({shown}{', ...' if len(distinct) > 4 else ''}); "
                f"set data.image_size (e.g. 224, or [height, width]) to resize them"
            )
        size = (int(distinct[0][0]), int(distinct[0][1]))
    else:
        size = _pair(image_size)
    kind = resolve_augment(augment, size)
    if len(distinct) == 1 and tuple(distinct[0]) == size:
        decode = Decode(channels, size, None)  # already the input size: used as they are
    else:
        cover = (round(size[0] / EVAL_CROP), round(size[1] / EVAL_CROP))
        # A random resized crop needs the margin the evaluation crop throws away.
        decode = Decode(channels, cover if kind == "random_resized_crop" else size, cover)
    mean = _stats(PAPER_MEAN if mean is None else mean, channels, "mean")
    std = _stats(PAPER_STD if std is None else std, channels, "std")

    counts = ", ".join(f"{s} {len(files[s])}" for s in files)
    say(f"[data] {root}: {len(listing.classes)} classes; images: {counts}"
        + (f"; {listing.ignored} other files ignored" if listing.ignored else "")
        + (f"; {skipped} unreadable images skipped (data.skip_bad)" if skipped else ""))
    if decode.cover is not None:
        say(f"[data] images resized to cover {decode.cover[0]}x{decode.cover[1]} and centre-cropped to "
            f"{decode.stored[0]}x{decode.stored[1]}; network input {size[0]}x{size[1]}")
    if "val" not in files:
        say("[data] no val/ folder: the validation split is cut from train (data.val_size)")
    if "test" not in files:
        say("[data] no test/ folder: the test split is empty (nothing is reported as test accuracy)")

    nbytes = sum(len(f) for f in files.values()) * channels * decode.stored[0] * decode.stored[1]
    budget = memory_budget(memory_gb)
    common = {"classes": listing.classes, "mean": mean, "std": std, "size": size}
    if nbytes > budget:
        say(f"[data] streamed: the decoded images would take {_gib(nbytes)} > data.memory_gb {_gib(budget)}; "
            f"{workers} decoding worker(s) per process" + (" (data.workers 0: decoded in the training process)" if not workers else ""))
        sets = {s: ImageFiles(root, files[s], torch.from_numpy(labels[s]), decode=decode, workers=workers, **common) for s in files}
    else:
        sets = _in_memory(listing, files, labels, decode, workers, skip_bad, cache_dir, progress, say, rank, world, common)
        say(f"[data] in memory: {_gib(nbytes)} within data.memory_gb {_gib(budget)}")
    test = sets.get("test")
    if test is None:
        empty = sets["train"].subset(torch.zeros(0, dtype=torch.int64))
        test = empty
    return sets["train"], sets.get("val"), test


def _in_memory(
    listing: Listing, files: dict, labels: dict, decode: Decode, workers: int, skip_bad: bool, cache_dir: Path | None,
    progress: bool, say: Log, rank: int, world: int, common: dict,
) -> dict[str, Dataset]:
    """Decode every split into memory, or read them from the cache."""
    from safetensors.torch import load_file, save_file

    spec = json.dumps({"version": _DECODE_VERSION, "key": listing.key, "decode": [decode.channels, decode.stored, decode.cover],
                       "skip_bad": skip_bad, "files": {s: len(f) for s, f in files.items()}})
    key = hashlib.sha256(spec.encode()).hexdigest()[:32]
    where = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if where is not None and rank != 0:
        # Process 0 decodes; the others wait for its file (torchrun stops them all if it fails).
        while not where.is_file():
            time.sleep(1.0)
    if where is not None and where.is_file():
        tensors = load_file(where)
        say(f"[data] decoded images read from the cache {where}")
        return {s: Dataset(tensors[f"{s}.images"], tensors[f"{s}.labels"], **common) for s in files}
    tensors = {}
    for split, paths in files.items():
        images, ok = decode_images(list(paths), decode, workers=workers, skip_bad=skip_bad, root=listing.root,
                                   progress=progress, desc=f"decode {split}")
        if not ok.all():
            say(f"[data] {split}: {int((~ok).sum())} images that could not be decoded skipped (data.skip_bad)")
        tensors[f"{split}.images"] = images
        tensors[f"{split}.labels"] = torch.from_numpy(labels[split][ok])
    if where is not None and rank == 0:
        _atomic_save(where, lambda tmp: save_file(tensors, str(tmp)))
        say(f"[data] decoded images cached in {where} (delete it to decode again)")
    return {s: Dataset(tensors[f"{s}.images"], tensors[f"{s}.labels"], **common) for s in files}
