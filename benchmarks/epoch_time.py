"""Time of one epoch of base training of the paper network: gross's trainer vs a plain PyTorch loop.

Both train the paper network (METHOD.md section 8) on CIFAR-10's 40,000 training images with the
authors' recipe (batch 256, SGD lr 0.1, momentum 0.9, weight decay 1e-3; pad 4, random crop,
flip, normalisation 0.5/0.5), on the CPU:

- gross: :func:`gross.train.train_base` on the in-memory uint8 dataset, augmentation and
  normalisation batched on tensors;
- plain: a ``torch.utils.data.DataLoader`` over a map-style dataset whose ``__getitem__`` pads,
  crops, flips and normalises one image at a time (the torchvision recipe, reimplemented without
  torchvision), then the same model, loss and optimizer.

Each variant is timed over ``--steps`` steps (default: the whole epoch), repeated ``--repeats``
times in alternation (the order rotating every repeat) so that all see the same machine load;
the median is reported. Without
``/work/shared/data/cifar10`` (or ``--data``) random images of the same size stand in, and the
output says so.

    python benchmarks/epoch_time.py --steps 40      # writes benchmarks/results/epoch_time.json
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
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from gross.config import TrainConfig
from gross.data import Augmentation, Dataset, Splits, load_dataset
from gross.models import PaperNet
from gross.train import train_base

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class PerImage(TorchDataset):
    """The usual per-image pipeline: pad 4, random 32x32 crop, flip p=0.5, to float, normalise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pad: int = 4) -> None:
        self.images = images  # (N, H, W, C) uint8
        self.labels = labels
        self.pad = pad
        self.mean = np.array(MEAN, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(STD, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        h, w, _ = img.shape
        p = self.pad
        padded = np.pad(img, ((p, p), (p, p), (0, 0)))
        top, left = np.random.randint(0, 2 * p + 1, size=2)
        crop = padded[top : top + h, left : left + w]
        if np.random.rand() < 0.5:
            crop = crop[:, ::-1]
        x = (crop.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x), int(self.labels[i])


def plain_epoch(
    images: np.ndarray, labels: np.ndarray, steps: int, batch: int, workers: int, seed: int, channels_last: bool = False
) -> float:
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = PaperNet()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loader = DataLoader(PerImage(images, labels), batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=False, drop_last=False)
    model.train()
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        loss.backward()
        opt.step()
        loss.item()  # as a loop that logs its loss does
    return time.perf_counter() - start


def gross_epoch(train: Dataset, steps: int, batch: int, seed: int, channels_last: bool) -> float:
    torch.manual_seed(seed)
    model = PaperNet()
    part = train.subset(torch.arange(min(len(train), steps * batch)))
    empty = train.subset(torch.arange(0))
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.1, weight_decay=1e-3, seed=seed, checkpoint_every=0)
    start = time.perf_counter()
    train_base(model, Splits(part, empty, empty), cfg, augmentation=Augmentation(pad=4, flip=True),
               channels_last=channels_last)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/work/shared/data/cifar10", help="CIFAR-10 folder (train.npz + test.npz)")
    parser.add_argument("--steps", type=int, default=0, help="steps to time (0: the whole epoch, 157 steps)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers of the plain loop")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "epoch_time.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = "CIFAR-10 " + args.data
    if Path(args.data, "train.npz").is_file() or Path(args.data, "cifar-10-batches-py").is_dir():
        splits = load_dataset(args.data, val_size=10000, seed=0, mean=MEAN, std=STD)
        train = splits.train
    else:
        source = f"SYNTHETIC random uint8 images (no CIFAR-10 at {args.data})"
        gen = torch.Generator().manual_seed(0)
        train = Dataset(torch.randint(0, 256, (40000, 3, 32, 32), dtype=torch.uint8, generator=gen),
                        torch.randint(0, 10, (40000,), generator=gen), tuple(map(str, range(10))), MEAN, STD)
    print(f"data: {source}; {len(train)} training images")
    images = train.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = train.labels.numpy()
    full_steps = -(-len(train) // args.batch)
    steps = args.steps or full_steps

    variants = {"gross": lambda n, s: gross_epoch(train, n, args.batch, s, False),
                "gross channels_last": lambda n, s: gross_epoch(train, n, args.batch, s, True)}
    for w in args.workers:
        variants[f"plain DataLoader workers={w}"] = lambda n, s, w=w: plain_epoch(images, labels, n, args.batch, w, s)
    # Not the baseline: shows how much of the difference is the memory format alone.
    variants["plain workers=0 channels_last"] = lambda n, s: plain_epoch(images, labels, n, args.batch, 0, s, True)
    for run in variants.values():  # warm-up: oneDNN picks and caches its kernels on first use
        run(2, 0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        # Rotate the order every repeat so that no variant always follows the same one.
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(variants[name](steps, r))
            print(f"  repeat {r + 1}: {name}: {times[name][-1]:.2f}s", flush=True)
    # The machine is shared: the minimum is the least disturbed repeat, the median the typical one.
    per_epoch = {k: statistics.median(v) * full_steps / steps for k, v in times.items()}
    per_epoch_min = {k: min(v) * full_steps / steps for k, v in times.items()}
    best_plain = min(v for k, v in per_epoch.items() if k.startswith("plain DataLoader"))
    best_plain_min = min(v for k, v in per_epoch_min.items() if k.startswith("plain DataLoader"))
    print(f"\n{'variant':32s} {'s/epoch median':>15s} {'vs plain':>9s} {'s/epoch min':>12s} {'vs plain':>9s}")
    for k in per_epoch:
        print(f"{k:32s} {per_epoch[k]:15.2f} {best_plain / per_epoch[k]:8.2f}x "
              f"{per_epoch_min[k]:12.2f} {best_plain_min / per_epoch_min[k]:8.2f}x")
    result = {
        "what": f"one epoch of base training, paper network, batch {args.batch}, SGD; "
        f"median of {args.repeats} repeats of {steps} steps, scaled to {full_steps} steps",
        "data": source,
        "threads": args.threads,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "steps_timed": steps,
        "seconds_timed": times,
        "seconds_per_epoch_median": {k: round(v, 2) for k, v in per_epoch.items()},
        "seconds_per_epoch_min": {k: round(v, 2) for k, v in per_epoch_min.items()},
        "speedup_vs_best_plain_median": {k: round(best_plain / v, 2) for k, v in per_epoch.items()},
        "speedup_vs_best_plain_min": {k: round(best_plain_min / v, 2) for k, v in per_epoch_min.items()},
        "note": "gross run uses channels_last (config channels_last: true) by default",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
