"""Size of the series' difference terms, nested (warm-started) vs. independent decompositions.

A nested series should store small corrections: the terms ``p_i, r_i, q_i`` (i > 1) small against
the factors ``P_i, R_i, Q_i`` they add up to. Independent fits are unaligned, so their differences
are as large as the factors (ratio about 1.4 for two unrelated factors of equal norm); fits with
large cancelling blocks show up as terms far larger than the weight. Per layer, series kind,
penalty and group size the benchmark prints the fit's relative error, its conditioning ``kappa``
(``gross.conditioning``), ``|term| / |factor|`` (the largest of the three) and the core term's
norm over the weight's (the figure earlier versions of this benchmark reported).

    python benchmarks/nested_conditioning.py [--weights runs/NAME/base/model.safetensors]

Without ``--weights``: He-initialised 3x3 layers of the paper network's shapes. Writes
``benchmarks/results/nested_conditioning.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from gross import GroSSConv2d, conditioning
from gross.btd import PENALTY

LAYERS = {"conv2": (32, 32), "conv3": (32, 64), "conv4": (64, 64)}  # name: (C_in, C_out)


def load_convs(weights: str | None) -> tuple[dict[str, nn.Conv2d], str]:
    convs = {}
    state = None
    if weights:
        from safetensors.torch import load_file

        state = load_file(weights)
    for name, (c_in, c_out) in LAYERS.items():
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        if state is None:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            key = next(k for k in state if k.endswith(f"{name}.weight"))
            with torch.no_grad():
                conv.weight.copy_(state[key])
        convs[name] = conv
    return convs, f"trained weights from {weights}" if weights else "random He-initialised weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="safetensors state dict of the paper network (keys ending in conv2.weight, ...)")
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, PENALTY])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "nested_conditioning.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    convs, source = load_convs(args.weights)
    print(source, flush=True)
    rows = []
    for name, conv in convs.items():
        weight = conv.weight.detach()
        w_norm = float(weight.norm())
        for penalty in args.penalties:
            for nested in (True, False):
                start = time.perf_counter()
                layer = GroSSConv2d.from_conv(conv, nested=nested, penalty=penalty)
                seconds = time.perf_counter() - start
                for i, s in enumerate(layer.group_sizes):
                    factors = layer.factors(s)
                    terms = (layer.first[i], layer.core[i], layer.last[i])
                    ratio = max(float(t.norm()) / float(f.norm()) for t, f in zip(terms, factors)) if i else float("nan")
                    row = {
                        "layer": name,
                        "penalty": penalty,
                        "nested": nested,
                        "group_size": s,
                        "relative_error": float((layer.dense_weight(s) - weight).detach().norm()) / w_norm,
                        "kappa": conditioning(layer.decomposition(s)),
                        "term_over_factor": ratio,
                        "term_core_norm_over_weight_norm": float(layer.core[i].detach().norm()) / w_norm,
                        "decompose_seconds": seconds,
                    }
                    rows.append(row)
                    print(f"{name} penalty {penalty:<4g} {'nested' if nested else 'independent':>11} g={s:3d} "
                          f"error {row['relative_error']:.4f} kappa {row['kappa']:7.2f} "
                          f"|term|/|factor| {ratio:6.2f} |r_i|/|W| {row['term_core_norm_over_weight_norm']:8.2f}",
                          flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"weights": source, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
