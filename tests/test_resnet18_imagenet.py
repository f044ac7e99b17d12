"""The ImageNet ResNet-18 in torchvision's layout, and every stage of experiments/imagenet-resnet18.yaml
on the CPU on a generated folder of a few 224 px images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gross.models import load_weights, resnet18_imagenet

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "imagenet-resnet18.yaml"


def torchvision_resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The state dict of ``torchvision.models.resnet18()``, key by key, in its order (written from
    torchvision's documented layout: torchvision is not a dependency)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    c = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            shapes[f"{p}.conv1.weight"] = (width, c if block == 0 else width, 3, 3)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            if block == 0 and layer > 1:
                shapes[f"{p}.downsample.0.weight"] = (width, c, 1, 1)
                bn(f"{p}.downsample.1", width)
        c = width
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def test_torchvision_state_dict_loads_unchanged(tmp_path: Path) -> None:
    expected = torchvision_resnet18_shapes()
    model = resnet18_imagenet()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(expected.items())
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's resnet18
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) if s else torch.tensor(7)) for k, s in expected.items()}
    state = {k: (v.abs() + 0.1 if k.endswith("running_var") else v) for k, v in state.items()}
    for path, write in ((tmp_path / "r18.safetensors", lambda s, p: save_file(s, str(p))), (tmp_path / "r18.pth", torch.save)):
        write(state, path)
        fresh = load_weights(resnet18_imagenet(), path)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    out = fresh.eval()(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    # 7x7 stride-2 stem and max-pool: 224 px ends at 7x7 before the pooling, as torchvision's.
    feats = {}
    fresh.layer4.register_forward_hook(lambda m, i, o: feats.update(layer4=o.shape))
    fresh(torch.randn(1, 3, 224, 224))
    assert feats["layer4"] == (1, 512, 7, 7)


def _folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    """A few photographs' worth: 224 px and larger images of other shapes, as JPEG."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = [(224, 224), (300, 260), (240, 320)][i % 3]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG", quality=90)
    return root


@pytest.mark.slow  # about 100 s on 2 shared cores, most of it the BTD of four 64-channel convs
def test_imagenet_recipe_every_stage_on_the_cpu(tmp_path: Path) -> None:
    from gross import pipeline
    from gross.config import resolve_config

    root = _folder(tmp_path / "imgs")
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18_imagenet(num_classes=2).state_dict(), weights)  # torchvision's names
    overrides = [
        f"data.dataset={root}", f"model.weights={weights}", f"runs={tmp_path / 'runs'}", "device=cpu", "threads=2",
        "data.workers=0", "data.eval_batch_size=8", "data.cache=null",
        # BTD of a 256- or 512-channel conv takes minutes on the CPU: here only layer1's four
        # 64-channel convs are decomposed, at two of the recipe's sizes.
        "decompose.btd={max_iter: 2}", "decompose.group_sizes=[16, 32]",
        "decompose.skip=[conv1, layer2.*, layer3.*, layer4.*]",
        "reconstruct.epochs=1", "reconstruct.batch_size=6", "finetune.epochs=1", "finetune.batch_size=6",
        "evaluate.samples=1", "search.beam_width=1", "latency.repeats=1", "export.onnx=false",
    ]
    cfg = resolve_config([RECIPE], overrides)
    assert cfg.data.augment == "random_resized_crop" and cfg.data.memory_gb == 0 and cfg.search.strategy == "beam"
    tick = time.perf_counter()
    result = pipeline.run(cfg)
    seconds = time.perf_counter() - tick
    run = cfg.run_dir
    for stage in ("base", "decompose", "reconstruct", "gross"):
        assert (run / stage / "model.safetensors").is_file()
    best = json.loads((run / "search" / "best.json").read_text())
    assert len(best["best"]["config"]) == 4
    assert result.export["input_shape"] == [3, 224, 224]
    assert result.report.is_file()
    print(f"imagenet-resnet18 smoke run: {seconds:.1f} s")
