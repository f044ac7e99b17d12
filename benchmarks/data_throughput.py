"""Image-folder throughput: decoding, and one epoch of the paper network in memory vs streamed.

Two measurements (docs/data.md):

1. **Decoding**: images decoded per second by :func:`gross.imagefolder.decode_images` (Pillow,
   the function both paths use) for PNG and JPEG at 32 and 224 px, with 0, 1 and 2 worker
   processes; and, for JPEG, ``simplejpeg`` (libjpeg-turbo without Pillow's image objects) when
   it is installed, to see whether a faster decoder is worth a dependency.
2. **Training**: base training of the paper network (batch 256, channels-last, the authors'
   augmentation) on CIFAR-10's 40,000 training images, from
   - ``npz``: today's path, ``/work/shared/data/cifar10/train.npz`` held in memory;
   - ``folder cached``: the same images written as a PNG image folder, decoded once and read
     back from the cache (the in-memory path of an image folder);
   - ``folder streamed``: the same folder with ``data.memory_gb: 0``, decoded by 2 worker
     processes while training.
   Each variant trains ``--steps`` steps (default 40 of the epoch's 157), repeated ``--repeats``
   times in alternation (order rotating) so all see the same machine load; the median is scaled to
   the full epoch and the ratios to ``npz`` are the result. The machine is shared: absolute times
   vary between runs, the ratios within one run are what to read.

    python benchmarks/data_throughput.py          # writes benchmarks/results/data_throughput.{json,md}

The CIFAR-10 folder is written once under ``--work`` (default /tmp/gross-data-throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gross.config import TrainConfig
from gross.data import Augmentation, Splits, load_dataset
from gross.imagefolder import Decode, decode_images
from gross.models import PaperNet
from gross.train import train_base

CIFAR = Path("/work/shared/data/cifar10")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RESULTS = Path(__file__).resolve().parent / "results"


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, split: str, fmt: str, quality: int = 90) -> None:
    for i, (x, y) in enumerate(zip(images, labels)):
        folder = root / split / CLASSES[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(folder / f"{i:05d}.{fmt}", **({"quality": quality} if fmt == "jpg" else {}))


def cifar_folder(work: Path) -> Path:
    """CIFAR-10 as train/<class>/*.png and test/<class>/*.png, written once."""
    root = work / "cifar10-png"
    done = root / ".complete"
    if not done.is_file():
        for split in ("train", "test"):
            with np.load(CIFAR / f"{split}.npz") as f:
                write_folder(root, f["x"], f["y"], split, "png")
        done.write_text("")
    return root


def decode_rates(work: Path, n32: int, n224: int) -> list[dict]:
    with np.load(CIFAR / "test.npz") as f:
        small = f["x"][:n32]
    # Photographs are smooth, not noise: CIFAR images upsampled to 224 px compress like photos.
    large = np.stack([np.asarray(Image.fromarray(x).resize((224, 224), Image.Resampling.BICUBIC)) for x in small[:n224]])
    rows = []
    for fmt in ("png", "jpg"):
        for size, images in ((32, small), (224, large)):
            root = work / f"decode-{fmt}{size}"
            if not root.is_dir():
                write_folder(root, images, np.zeros(len(images), dtype=np.int64), "train", fmt)
            paths = sorted(str(p) for p in root.rglob(f"*.{fmt}"))
            for workers in (0, 1, 2):
                decode_images(paths[:64], Decode(3, (size, size)), workers=workers)  # warm the page cache
                tick = time.perf_counter()
                decode_images(paths, Decode(3, (size, size)), workers=workers)
                rate = len(paths) / (time.perf_counter() - tick)
                rows.append({"format": fmt, "size": size, "decoder": "pillow", "workers": workers, "images_per_s": round(rate)})
                print(f"decode {fmt} {size}px pillow workers={workers}: {rate:.0f} img/s", flush=True)
            if fmt == "jpg":
                try:
                    import simplejpeg
                except ImportError:
                    continue
                blobs = [Path(p).read_bytes() for p in paths]
                tick = time.perf_counter()
                for b in blobs:
                    simplejpeg.decode_jpeg(b, colorspace="RGB")
                rate = len(paths) / (time.perf_counter() - tick)
                tick = time.perf_counter()
                for p in paths:
                    with Image.open(p) as img:
                        np.asarray(img.convert("RGB"))
                pil = len(paths) / (time.perf_counter() - tick)
                rows.append({"format": fmt, "size": size, "decoder": "simplejpeg (bytes in memory)", "workers": 0, "images_per_s": round(rate)})
                rows.append({"format": fmt, "size": size, "decoder": "pillow (open + convert only)", "workers": 0, "images_per_s": round(pil)})
                print(f"decode {fmt} {size}px simplejpeg: {rate:.0f} img/s; pillow open+convert: {pil:.0f} img/s", flush=True)
    return rows


def train_seconds(splits: Splits, steps: int, batch: int) -> float:
    n = steps * batch
    data = Splits(splits.train.subset(torch.arange(n)), splits.val.subset(torch.arange(0)), splits.test)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.1, weight_decay=1e-3, eval_every=0, checkpoint_every=0)
    torch.manual_seed(0)
    model = PaperNet()
    tick = time.perf_counter()
    train_base(model, data, cfg, device="cpu", augmentation=Augmentation(pad=4, flip=True), channels_last=True)
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gross-data-throughput"))
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per repeat (of 157 per epoch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the streamed variant")
    parser.add_argument("--decode-images", type=int, nargs=2, default=(2000, 400), metavar=("N32", "N224"))
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="measure decoding only and replace it in the existing results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    batch, epoch_steps = 256, 40000 // 256 + 1

    decode = [] if args.skip_decode else decode_rates(args.work, *args.decode_images)
    if args.decode_only:
        path = RESULTS / "data_throughput.json"
        out = json.loads(path.read_text())
        out["decode"] = decode
        out["decode_load_average_at_end"] = os.getloadavg()
        path.write_text(json.dumps(out, indent=2) + "\n")
        md = RESULTS / "data_throughput.md"
        head, _, tail = md.read_text().partition("## Decoding (images per second)")
        _, _, rest = tail.partition("\n## ")
        table = ["## Decoding (images per second)", "", "| format | size | decoder | workers | images/s |", "| --- | --- | --- | --- | --- |",
                 *[f"| {r['format']} | {r['size']} | {r['decoder']} | {r['workers']} | {r['images_per_s']} |" for r in decode], ""]
        md.write_text(head + "\n".join(table) + "\n## " + rest)
        return

    tick = time.perf_counter()
    folder = cifar_folder(args.work)
    written = time.perf_counter() - tick
    cache = args.work / "cache"
    for old in cache.glob("*.safetensors"):
        old.unlink()  # time the first decoding
    common = {"val_size": 10000, "seed": 0, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    tick = time.perf_counter()
    load_dataset(folder, cache=cache, workers=2, progress=False, **common)
    first_load = time.perf_counter() - tick
    tick = time.perf_counter()
    variants = {
        "npz": lambda: load_dataset(CIFAR, **common),
        "folder cached": lambda: load_dataset(folder, cache=cache, workers=2, progress=False, **common),
        "folder streamed": lambda: load_dataset(folder, cache=cache, workers=args.workers, memory_gb=0, progress=False, **common),
    }
    loaded, load_s = {}, {}
    for name, load in variants.items():
        tick = time.perf_counter()
        loaded[name] = load()
        load_s[name] = round(time.perf_counter() - tick, 2)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            s = train_seconds(loaded[name], args.steps, batch)
            seconds[name].append(round(s, 3))
            print(f"repeat {r + 1}: {name}: {s:.2f} s for {args.steps} steps", flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    per_epoch = {k: round(v * epoch_steps / args.steps, 2) for k, v in median.items()}
    ratio = {k: round(v / median["npz"], 3) for k, v in median.items()}
    out = {
        "what": f"base training of the paper network, batch {batch}, channels-last, pad-crop-flip; median of {args.repeats} repeats "
                f"of {args.steps} steps, scaled to the {epoch_steps} steps of a 40,000-image epoch",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "pillow": Image.__version__, "threads": 2, "load_average_at_end": os.getloadavg()},
        "note": "2 shared cores with other work running: absolute times vary between runs; read the ratios, measured in alternation within this run",
        "decode": decode,
        "folder": {"written_s": round(written, 1), "first_decode_s": round(first_load, 1), "load_s": load_s},
        "seconds_timed": seconds,
        "seconds_per_epoch": per_epoch,
        "ratio_to_npz": ratio,
        "streamed_workers": args.workers,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Image-folder throughput",
        "",
        "`python benchmarks/data_throughput.py` on this machine (2 shared cores; "
        f"load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}). Other work ran at the same time: "
        "the ratios, measured in alternation within one run, are the result; absolute times are not.",
        "",
        "## Decoding (images per second)",
        "",
        "| format | size | decoder | workers | images/s |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r['format']} | {r['size']} | {r['decoder']} | {r['workers']} | {r['images_per_s']} |" for r in decode],
        "",
        f"## One epoch of the paper network ({out['what']})",
        "",
        "| data | s per epoch | ratio to npz | load s |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {per_epoch[k]} | {ratio[k]:.3f} | {load_s[k]} |" for k in names],
        "",
        f"The CIFAR-10 PNG folder took {written:.0f} s to write (once) and {first_load:.1f} s to decode into the cache "
        f"the first time; the streamed variant decodes with {args.workers} worker processes.",
        "",
    ]
    (RESULTS / "data_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
