"""Speed and error of ``gross.btd`` against the authors' BTD algorithm, on the same weights.

Baseline (the authors' method, as described in METHOD.md section 1): block coordinate descent.
For each block in turn, subtract the other blocks from ``W`` and fit a rank-(g, g) Tucker term over
the two channel modes by HOOI (``tensorly.decomposition.partial_tucker``, modes [0, 1], SVD init,
tensorly's default HOOI settings), cold-started every time; sweep until the relative error
decreases by less than 1e-6 in a sweep, or until a per-case time cap (reported as capped).
tensorly runs on its PyTorch backend, on the float32 weight, so both methods use the same BLAS
with the same ``torch.set_num_threads``.

gross: ``gross.btd(W, g)`` with its defaults (tol 1e-5 per ALS step, block-norm penalty 0.1); it
computes in float64. Besides its own time to converge, the table gives the time it needs to first
reach the baseline's final error (the same deterministic run, stopped at that step), and, for
both methods, the conditioning ``kappa = sum_r ||W_r||^2 / ||sum_r W_r||^2`` of the fit (1 for
orthogonal blocks; large when large blocks cancel, which makes a fit diverge in training).
``--penalty 0`` gives the plain least-squares fits of the library before the penalty.

With ``--weights``, the whole paper-network series (every power-of-two group size of conv2, conv3
and conv4, independent fits, ``gross.decompose``) is also timed, with ``--threads`` threads.

Layers: the paper network's decomposed convs (conv2 32->32, conv3 32->64, conv4 64->64, 3x3)
from ``--weights`` (a safetensors state dict), else random He-initialised weights (said in the
output), and a random He-initialised 256->256 3x3 layer. Group sizes 1, 4, 16 and D.

Usage::

    PYTHONPATH=src python benchmarks/btd_speed.py [--weights runs/NAME/base/model.safetensors] [--quick]

Writes ``benchmarks/results/btd_speed{,_quick}.json`` and ``.md``.

Large layers and whole networks (no tensorly baseline: it takes minutes per fit at 512 channels)::

    git show HEAD~1:src/gross/btd.py > /tmp/btd_old.py
    PYTHONPATH=src python benchmarks/btd_speed.py --large --against /tmp/btd_old.py --sizes 8,64,256
    PYTHONPATH=src python benchmarks/btd_speed.py --series resnet18 [--distinct]

``--large`` fits a random He 512x512x3x3 weight (float32, as a conv stores it) with this checkout's
``gross.btd`` and, interleaved in the same process, with the ``btd`` of the file given to
``--against`` (an earlier version of ``gross/btd.py``), and writes ``btd_large.{json,md}``.
``--series`` times ``gross.btd`` at every power-of-two group size up to ``C_in`` for every 3x3 conv
of an ImageNet ResNet-18 (all but the 7x7 stem) or VGG-16 (all but the first conv), on random He
weights of the real shapes (no trained ImageNet weights are available offline); ``--distinct`` fits
one conv per distinct shape and counts it as many times as the shape occurs (an estimate, said in
the output). Writes ``btd_series_{NET}.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from gross import decompose, gross_layers
from gross.btd import PENALTY, btd, conditioning
from gross.models import PaperNet

PAPER_LAYERS = {"conv2": (32, 32), "conv3": (64, 32), "conv4": (64, 64)}  # name: (C_out, C_in)
BASELINE_TOL = 1e-6
# (C_out, C_in) of the 3x3 convs that are decomposed, in network order.
SERIES_CONVS = {
    "resnet18": [(64, 64)] * 4 + [(128, 64)] + [(128, 128)] * 3 + [(256, 128)] + [(256, 256)] * 3
    + [(512, 256)] + [(512, 512)] * 3,
    "vgg16": [(64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (512, 256)] + [(512, 512)] * 5,
}


def he_weight(c_out: int, c_in: int, gen: torch.Generator, k: int = 3) -> torch.Tensor:
    """He (Kaiming) normal init, fan_out, ReLU: the paper network's conv init."""
    return torch.randn(c_out, c_in, k, k, generator=gen) * math.sqrt(2.0 / (c_out * k * k))


def load_layers(weights: str | None, quick: bool) -> tuple[list[tuple[str, torch.Tensor]], str]:
    gen = torch.Generator().manual_seed(0)
    layers = []
    if weights:
        from safetensors.torch import load_file

        state = load_file(weights)
        for name, shape in PAPER_LAYERS.items():
            keys = [k for k in state if k == f"{name}.weight" or k.endswith(f".{name}.weight")]
            if len(keys) != 1:
                raise SystemExit(f"{weights}: expected one key {name}.weight (or ending in it), found {keys}")
            w = state[keys[0]].float()
            if tuple(w.shape[:2]) != shape:
                raise SystemExit(f"{name}.weight has shape {tuple(w.shape)}, expected {shape} x k x k")
            layers.append((name, w))
        source = f"paper-network layers: trained weights from {weights}"
    else:
        layers = [(name, he_weight(*shape, gen)) for name, shape in PAPER_LAYERS.items()]
        source = "paper-network layers: RANDOM He-initialised weights (no --weights given; no trained checkpoint used)"
    if not quick:
        layers.append(("conv256", he_weight(256, 256, gen)))
        source += "; conv256: random He-initialised 256->256 3x3"
    return layers, source


def baseline_btd(w: torch.Tensor, g: int, cap_s: float) -> dict:
    """The authors' block coordinate descent with cold-started HOOI per block (tensorly)."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    n_blocks = w.shape[1] // g
    norm = torch.linalg.norm(w)
    blocks: list[torch.Tensor | None] = [None] * n_blocks
    total = torch.zeros_like(w)
    errors: list[float] = []
    capped = False
    start = time.perf_counter()
    sweeps = 0.0
    while not capped:
        for r in range(n_blocks):
            if blocks[r] is not None:
                total = total - blocks[r]
            (core, factors), _ = partial_tucker(w - total, rank=[g, g], modes=[0, 1], init="svd")
            blocks[r] = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
            total = total + blocks[r]
            if time.perf_counter() - start > cap_s:
                capped = True
                sweeps += (r + 1) / n_blocks
                break
        else:
            sweeps += 1
        errors.append(float(torch.linalg.norm(w - total) / norm))
        if len(errors) > 1 and errors[-2] - errors[-1] < BASELINE_TOL:
            break
    elapsed = time.perf_counter() - start
    kappa = float(sum(float(b.norm()) ** 2 for b in blocks if b is not None) / float(total.norm()) ** 2)
    return {"time_s": elapsed, "error": errors[-1], "kappa": kappa, "sweeps": sweeps, "capped": capped}


def gross_btd(w: torch.Tensor, g: int, target: float, penalty: float) -> dict:
    start = time.perf_counter()
    fit = btd(w, g, penalty=penalty)
    elapsed = time.perf_counter() - start
    out = {"time_s": elapsed, "error": fit.errors[-1], "kappa": conditioning(fit), "steps": len(fit.errors) - 1}
    # Steps are deterministic, so the run stopped at the first step at or below the target
    # retraces this one.
    hit = next((j for j, e in enumerate(fit.errors) if e <= target), None)
    if hit is None:
        out["time_to_baseline_error_s"] = None
    else:
        start = time.perf_counter()
        btd(w, g, max_iter=hit, penalty=penalty)
        out["time_to_baseline_error_s"] = time.perf_counter() - start
    return out


def fmt_time(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f}" if t < 100 else f"{t:.0f}"


def fmt_ratio(a: float, b: float | None) -> str:
    return "-" if b is None else f"{a / max(b, 1e-9):.0f}x" if a / max(b, 1e-9) >= 10 else f"{a / max(b, 1e-9):.1f}x"


def markdown(rows: list[dict]) -> str:
    head = (
        "| layer | C_out x C_in | g | baseline time (s) | baseline sweeps | baseline error | baseline kappa "
        "| gross time (s) | gross steps | gross error | gross kappa | error vs baseline | speed-up "
        "| gross time to baseline error (s) | speed-up at baseline error |"
    )
    lines = [head, "|" + " --- |" * 15]
    for r in rows:
        b, m = r["baseline"], r["gross"]
        sweeps = f"{b['sweeps']:.1f}" + (" (capped)" if b["capped"] else "")
        lines.append(
            f"| {r['layer']} | {r['c_out']} x {r['c_in']} | {r['g']} | {fmt_time(b['time_s'])} | {sweeps} "
            f"| {b['error']:.5f} | {b['kappa']:.2f} | {fmt_time(m['time_s'])} | {m['steps']} | {m['error']:.5f} "
            f"| {m['kappa']:.2f} | {100 * (m['error'] / max(b['error'], 1e-12) - 1):+.2f}% "
            f"| {fmt_ratio(b['time_s'], m['time_s'])} | {fmt_time(m['time_to_baseline_error_s'])} "
            f"| {fmt_ratio(b['time_s'], m['time_to_baseline_error_s'])} |"
        )
    return "\n".join(lines)


def series_time(weights: str, penalty: float, tol: float) -> dict:
    """Seconds to decompose the paper network's whole series (gross.decompose, independent fits)."""
    from safetensors.torch import load_file

    state = load_file(weights)
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    net = PaperNet()
    net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    start = time.perf_counter()
    decompose(net, skip=["conv1"], nested=False, penalty=penalty, tol=tol, max_iter=2000)
    seconds = time.perf_counter() - start
    kappas = {f"{name}/{s}": conditioning(layer.decomposition(s)) for name, layer in gross_layers(net) for s in layer.group_sizes}
    errors = {}
    for name, layer in gross_layers(net):
        w = state[f"{prefix}{name}.weight"].double()
        for s in layer.group_sizes:
            errors[f"{name}/{s}"] = float((layer.dense_weight(s).detach().double() - w).norm() / w.norm())
    return {"tol": tol, "seconds": seconds, "fits": len(kappas), "kappa_max": max(kappas.values()),
            "threads": torch.get_num_threads(), "errors": errors, "kappas": kappas}


def load_btd(path: str):
    """The ``btd`` and ``conditioning`` functions of another copy of ``gross/btd.py``."""
    spec = importlib.util.spec_from_file_location("btd_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_fit(btd_fn, conditioning_fn, w: torch.Tensor, g: int) -> dict:
    start = time.perf_counter()
    fit = btd_fn(w, g)
    seconds = time.perf_counter() - start
    return {"time_s": seconds, "steps": len(fit.errors) - 1, "error": fit.errors[-1], "kappa": conditioning_fn(fit)}


def large(args: argparse.Namespace, out: Path) -> None:
    """512x512x3x3 He weight: this checkout against ``--against``, interleaved per group size."""
    w = he_weight(512, 512, torch.Generator().manual_seed(0))
    other = load_btd(args.against) if args.against else None
    rows = []
    for g in [int(s) for s in args.sizes.split(",")]:
        row = {"g": g}
        if other is not None:
            row["before"] = timed_fit(other.btd, other.conditioning, w, g)
        row["after"] = timed_fit(btd, conditioning, w, g)
        rows.append(row)
        print(json.dumps(row), flush=True)
    settings = {"weight": "random He 512x512x3x3, float32, seed 0", "against": args.against, "threads": args.threads,
                "torch": torch.__version__, "load_average_at_start": os.getloadavg()}
    (out / "btd_large.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = ["| g | before (s) | steps | error | kappa | after (s) | steps | error | kappa | speed-up | error change |",
             "|" + " --- |" * 11]
    for r in rows:
        a, b = r["after"], r.get("before")
        if b is None:
            lines.append(f"| {r['g']} | - | - | - | - | {a['time_s']:.1f} | {a['steps']} | {a['error']:.4f} | {a['kappa']:.2f} | - | - |")
        else:
            lines.append(f"| {r['g']} | {b['time_s']:.1f} | {b['steps']} | {b['error']:.4f} | {b['kappa']:.2f} "
                         f"| {a['time_s']:.1f} | {a['steps']} | {a['error']:.4f} | {a['kappa']:.2f} "
                         f"| {b['time_s'] / a['time_s']:.1f}x | {100 * (a['error'] / b['error'] - 1):+.2f}% |")
    notes = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    (out / "btd_large.md").write_text(f"# gross.btd on a 512-channel layer, before and after\n\n{notes}\n\n" + "\n".join(lines) + "\n")


def series(args: argparse.Namespace, out: Path) -> None:
    """Seconds for every power-of-two group size of every decomposed 3x3 conv of a network."""
    convs = SERIES_CONVS[args.series]
    counts: dict[tuple[int, int], int] = {}
    for shape in convs:
        counts[shape] = counts.get(shape, 0) + 1
    todo = [(shape, counts[shape]) for shape in counts] if args.distinct else [(shape, 1) for shape in convs]
    gen = torch.Generator().manual_seed(0)
    fits, total = [], 0.0
    for (c_out, c_in), times in todo:
        w = he_weight(c_out, c_in, gen)
        for g in [2**j for j in range(c_in.bit_length()) if 2**j <= c_in]:
            fit = timed_fit(btd, conditioning, w, g)
            fit.update(c_out=c_out, c_in=c_in, g=g, counted=times)
            fits.append(fit)
            total += times * fit["time_s"]
            print(json.dumps(fit), flush=True)
    settings = {"network": args.series, "convs": len(convs), "distinct_shapes_only": args.distinct,
                "weights": "random He of the real shapes, float32", "threads": args.threads, "torch": torch.__version__,
                "load_average_at_start": os.getloadavg()}
    result = {"settings": settings, "total_s": total, "fits": fits}
    (out / f"btd_series_{args.series}.json").write_text(json.dumps(result, indent=2) + "\n")
    how = "estimated: one conv per distinct shape, times its count" if args.distinct else "measured: every conv"
    lines = [f"# gross.btd series of {args.series}: {total:.0f} s ({how})", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()] + ["", "| C_out x C_in | g | counted | time (s) | steps | error | kappa |",
                                                              "|" + " --- |" * 7]
    lines += [f"| {f['c_out']} x {f['c_in']} | {f['g']} | {f['counted']} | {f['time_s']:.2f} | {f['steps']} | {f['error']:.4f} "
              f"| {f['kappa']:.2f} |" for f in fits]
    (out / f"btd_series_{args.series}.md").write_text("\n".join(lines) + "\n")
    print(f"{args.series}: {total:.0f} s ({how})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="safetensors state dict of the paper network (keys conv2.weight, ...)")
    parser.add_argument("--quick", action="store_true", help="paper layers only, short baseline cap")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both methods")
    parser.add_argument("--cap", type=float, help="baseline time cap per case in seconds (default 25; quick 5)")
    parser.add_argument("--cap-large", type=float, default=60.0, help="baseline time cap for the 256-channel layer")
    parser.add_argument("--penalty", type=float, default=PENALTY, help="gross.btd penalty (0: plain least squares)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="every power-of-two group size of the paper layers (default 1, 4, 16 and full)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--large", action="store_true", help="512x512 layer only, against --against (see the notes)")
    parser.add_argument("--against", help="another copy of gross/btd.py to time --large against")
    parser.add_argument("--sizes", default="8,64,256", help="group sizes for --large")
    parser.add_argument("--series", choices=sorted(SERIES_CONVS), help="whole-network series times only")
    parser.add_argument("--distinct", action="store_true", help="--series: one conv per distinct shape, counted")
    args = parser.parse_args()
    cap = args.cap if args.cap is not None else (5.0 if args.quick else 25.0)

    torch.set_num_threads(args.threads)
    if args.large or args.series:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.large:
            large(args, out)
        else:
            series(args, out)
        return
    layers, source = load_layers(args.weights, args.quick)
    import tensorly

    settings = {
        "weights": source,
        "threads": args.threads,
        "baseline": f"tensorly {tensorly.__version__} partial_tucker HOOI per block, cold start, pytorch backend, float32; "
        f"stop at error decrease < {BASELINE_TOL} per sweep or after {cap:g} s ({args.cap_large:g} s for conv256)",
        "gross": f"gross.btd defaults (tol 1e-5, float64 internally), penalty {args.penalty:g}",
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible",
        "load_average_at_start": os.getloadavg(),
    }
    print(f"weights: {source}", flush=True)
    print(f"threads: {args.threads}; baseline cap {cap:g} s per case ({args.cap_large:g} s for conv256)", flush=True)

    rows = []
    for name, w in layers:
        c_out, c_in = w.shape[:2]
        sizes = [2**j for j in range(c_in.bit_length())] if args.all_sizes and name != "conv256" else [1, 4, 16, c_in]
        for g in sorted(set(sizes)):
            base = baseline_btd(w, g, args.cap_large if name == "conv256" else cap)
            mine = gross_btd(w, g, base["error"], args.penalty)
            rows.append({"layer": name, "c_out": c_out, "c_in": c_in, "g": g, "baseline": base, "gross": mine})
            print(
                f"{name:8s} {c_out:3d}x{c_in:<3d} g={g:<3d} baseline {base['time_s']:7.2f}s "
                f"{base['sweeps']:7.1f} sweeps{' (capped)' if base['capped'] else '         '} err {base['error']:.5f} "
                f"kappa {base['kappa']:6.2f} | gross {mine['time_s']:7.2f}s {mine['steps']:5d} steps "
                f"err {mine['error']:.5f} kappa {mine['kappa']:6.2f} | "
                f"to baseline err {fmt_time(mine['time_to_baseline_error_s'])}s",
                flush=True,
            )

    table = markdown(rows)
    print("\n" + table)
    if args.weights:
        settings["series"] = [series_time(args.weights, args.penalty, tol) for tol in (1e-6, 1e-5)]
        for s in settings["series"]:
            print(f"whole series at tol {s['tol']:g}: {s['seconds']:.1f} s for {s['fits']} fits, {s['threads']} threads, "
                  f"largest kappa {s['kappa_max']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "btd_speed_quick" if args.quick else "btd_speed"
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    notes = "\n".join(f"- {k}: {v}" for k, v in settings.items() if k != "series")
    for s in settings.get("series", []):
        notes += (f"\n- whole paper-network series (gross.decompose, {s['fits']} fits) at tol {s['tol']:g}: "
                  f"{s['seconds']:.1f} s on {s['threads']} thread(s), largest kappa {s['kappa_max']:.2f}, "
                  f"largest error {max(s['errors'].values()):.4f}")
    (out / f"{stem}.md").write_text(f"# BTD speed: gross.btd vs the authors' algorithm\n\n{notes}\n\n{table}\n")
    print(f"\nwrote {out / (stem + '.json')} and .md")


if __name__ == "__main__":
    main()
