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
    PYTHONPATH=src python benchmarks/btd_speed.py --series resnet18,vgg16 [--distinct]
    PYTHONPATH=src python benchmarks/btd_speed.py --series resnet18,vgg16 --workers 1 2 --threads 2 [--max-channels 256] [--every-conv]
    PYTHONPATH=src python benchmarks/btd_speed.py --stopping [--weights ...] [--sizes 8,64,256]

``--large`` fits a random He 512x512x3x3 weight (float32, as a conv stores it) with this checkout's
``gross.btd`` and, interleaved in the same process, with the ``btd`` of the file given to
``--against`` (an earlier version of ``gross/btd.py``), and writes ``btd_large.{json,md}``; with
``--weights`` it does the same on those layers at every power-of-two group size below ``C_in``
(``btd_against_trained.{json,md}``).
``--series`` times ``gross.btd`` at every power-of-two group size up to ``C_in`` for every 3x3 conv
of an ImageNet ResNet-18 (all but the 7x7 stem) or VGG-16 (all but the first conv), on random He
weights of the real shapes (no trained ImageNet weights are available offline); ``--distinct`` fits
one conv per distinct shape (shared by the networks) and counts it as many times as the shape
occurs (an estimate, said in the output). Fits use the decompose stage's default options
(``DecomposeConfig().btd``). Writes ``btd_series_{NET}.{json,md}``. With ``--workers N [N ...]``
it instead times ``gross.decompose`` (wall seconds) over one conv of each distinct shape (up to
``--max-channels`` input channels) with each number of processes (``btd_series_workers.{json,md}``);
with ``--every-conv`` over every conv, the decompose stage's whole work on that network
(``btd_decompose_{NETS}.{json,md}``).
``--stopping`` fits He layers (and the paper layers of ``--weights``) at each ``--rtols``
and records how far the error creeps past ``tol``'s stop (``btd_stopping_fits.{json,md}``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gross import decompose, gross_layers
from gross.btd import PENALTY, RTOL, RTOL_MIN_WORK, btd, conditioning
from gross.config import DecomposeConfig
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
        missing = []
        for name, shape in PAPER_LAYERS.items():
            # A network's state dict (conv2.weight, model.conv2.weight) or bare layer weights (conv2).
            keys = [k for k in state if k in (name, f"{name}.weight") or k.endswith(f".{name}.weight")]
            if not keys:
                missing.append(name)
                continue
            if len(keys) != 1:
                raise SystemExit(f"{weights}: expected one key {name}.weight (or ending in it), found {keys}")
            w = state[keys[0]].float()
            if tuple(w.shape[:2]) != shape:
                raise SystemExit(f"{name}.weight has shape {tuple(w.shape)}, expected {shape} x k x k")
            layers.append((name, w))
        if not layers:
            raise SystemExit(f"{weights}: none of {list(PAPER_LAYERS)} found")
        source = f"paper-network layers: trained weights from {weights}" + (f" (not in it: {missing})" if missing else "")
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
    """This checkout against ``--against``, interleaved per case, on a 512x512x3x3 He weight at
    ``--sizes`` or, with ``--weights``, on those layers at every power-of-two size below ``C_in``."""
    if args.weights:
        layers, source = load_layers(args.weights, quick=True)
        cases = [(name, w, 2**j) for name, w in layers for j in range(w.shape[1].bit_length() - 1)]
        stem, title = "btd_against_trained", "gross.btd on trained layers, before and after"
    else:
        w = he_weight(512, 512, torch.Generator().manual_seed(0))
        cases = [("he512", w, int(s)) for s in args.sizes.split(",")]
        source = "random He 512x512x3x3, float32, seed 0"
        stem, title = "btd_large", "gross.btd on a 512-channel layer, before and after"
    other = load_btd(args.against) if args.against else None
    load_at_start = os.getloadavg()
    rows = []
    for name, w, g in cases:
        row = {"layer": name, "c_out": w.shape[0], "c_in": w.shape[1], "g": g}
        if other is not None:
            row["before"] = timed_fit(other.btd, other.conditioning, w, g)
        row["after"] = timed_fit(btd, conditioning, w, g)
        rows.append(row)
        print(json.dumps(row), flush=True)
    settings = {"weights": source, "against": args.against, "threads": args.threads, "torch": torch.__version__,
                "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = ["| layer | g | before (s) | steps | error | kappa | after (s) | steps | error | kappa | speed-up | error change |",
             "|" + " --- |" * 12]
    for r in rows:
        a, b = r["after"], r.get("before")
        after = f"{a['time_s']:.2f} | {a['steps']} | {a['error']:.4f} | {a['kappa']:.2f}"
        if b is None:
            lines.append(f"| {r['layer']} | {r['g']} | - | - | - | - | {after} | - | - |")
        else:
            lines.append(f"| {r['layer']} | {r['g']} | {b['time_s']:.2f} | {b['steps']} | {b['error']:.4f} | {b['kappa']:.2f} "
                         f"| {after} | {b['time_s'] / a['time_s']:.1f}x | {100 * (a['error'] / b['error'] - 1):+.2f}% |")
    notes = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    (out / f"{stem}.md").write_text(f"# {title}\n\n{notes}\n\n" + "\n".join(lines) + "\n")


def step_flops(k: int, o: int, i: int, d: int, g: int, data_products: int, core_ops: int) -> dict[str, float]:
    """Floating-point operations (a multiply-add is 2) of one ALS step of ``gross.btd``, by part.

    ``data_products``: products with the weight per step (``2 K O I D`` each; 3 before this
    version, 2 after); ``core_ops``: applications of the core's normal operator
    (``4 K D^2 g`` each) in the core step and the extrapolation's error (CG iterations + 2).
    Small terms (QR of the blocks, triangular solves, the blocks' norms) are counted roughly.
    The last and first steps' normal matrices (``sum_k B_k C B_k^T``) cost one core operator each.
    """
    data = 2 * k * o * i * d
    core_op = 4 * k * d * d * g
    direct = d * g <= 256 or (d * g <= 512 and d // g >= 16)
    core_solve = (2 * k * (d * g) ** 2 + (d * g) ** 3 / 3) if direct else (core_ops - 1) * core_op
    return {
        "core": 2 * o * d * d + 2 * d * d * i + 2 * k * d * i * g + core_solve,
        "last": data + 2 * k * d * i * g + core_op + d**3 / 3 + 2 * o * d * d + 2 * o * d * g + 2 * k * d * g * g,
        "first": data + 2 * k * d * i * g + core_op + d**3 / 3 + 2 * d * d * i + 2 * i * d * g + 2 * k * d * g * g,
        "error": 4 * d * i,
        "extrapolation": (data_products - 2) * data + 2 * o * d * d + 2 * d * d * i + 2 * k * d * i * g + core_op
        + 2 * (o + i) * d * g + k * d * i * g,
    }


def profile(args: argparse.Namespace, out: Path) -> None:
    """Seconds per ALS step against the step's arithmetic at the matrix-product rate of this run."""
    other = load_btd(args.against) if args.against else None
    load_at_start = os.getloadavg()
    a = torch.randn(2048, 2048, dtype=torch.float64)
    a @ a
    start = time.perf_counter()
    a @ a
    rate = 2 * 2048**3 / (time.perf_counter() - start)
    print(f"float64 matrix-product rate {rate / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    versions = [("after", sys.modules["gross.btd"], 2, 2 + 3)]
    if other is not None:
        versions.insert(0, ("before", other, 3, 2 + 10))
    for c in (32, 128, 512):
        w = he_weight(c, c, torch.Generator().manual_seed(0)).double().reshape(c, c, 9).permute(2, 0, 1).contiguous()
        for g in [2**j for j in range(c.bit_length()) if 2**j <= c // 2]:
            if c == 512 and g not in (1, 8, 64, 256):
                continue
            row = {"c": c, "g": g}
            for name, module, data_products, core_ops in versions:
                dtype = {"work_dtype": torch.float32} if name == "after" else {}
                fit = module._Fit(w, g, c, 0, PENALTY, **dtype)
                state = fit.svd_init()
                times = []
                for n in (1, 1 + args.profile_steps):
                    start = time.perf_counter()
                    fit.als(state, 0.0, 0.0, n)
                    times.append(time.perf_counter() - start)
                step = (times[1] - times[0]) / args.profile_steps
                flops = step_flops(9, c, c, c, g, data_products, core_ops)
                row[name] = {"step_s": step, "flops": flops, "flops_total": sum(flops.values()),
                             "arithmetic_s": sum(flops.values()) / rate}
            rows.append(row)
            print(json.dumps({"c": c, "g": g, **{v[0]: f"{row[v[0]]['step_s'] * 1e3:.1f} ms, "
                              f"{row[v[0]]['step_s'] / row[v[0]]['arithmetic_s']:.1f}x arithmetic" for v in versions}}), flush=True)
    settings = {"matmul_rate_gflops": rate / 1e9, "threads": args.threads, "against": args.against,
                "weights": "random He CxCx3x3 (after: float32 while the error is above 1%, as for a float32 weight; before: float64)",
                "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    (out / "btd_profile.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    names = [v[0] for v in versions]
    head = "| C | g | " + " | ".join(f"{n}: ms/step | {n}: GFLOP/step | {n}: time / arithmetic" for n in names) + " |"
    lines = [head, "|" + " --- |" * (2 + 3 * len(names))]
    for r in rows:
        cells = " | ".join(f"{r[n]['step_s'] * 1e3:.1f} | {r[n]['flops_total'] / 1e9:.3f} | {r[n]['step_s'] / r[n]['arithmetic_s']:.1f}x"
                           for n in names)
        lines.append(f"| {r['c']} | {r['g']} | {cells} |")
    notes = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    (out / "btd_profile.md").write_text(f"# gross.btd: time per ALS step against its arithmetic\n\n{notes}\n\n" + "\n".join(lines) + "\n")


def series(args: argparse.Namespace, out: Path) -> None:
    """Seconds for every power-of-two group size of every decomposed 3x3 conv of each network."""
    nets = args.series.split(",")
    unknown = sorted(set(nets) - set(SERIES_CONVS))
    if unknown:
        raise SystemExit(f"--series: unknown networks {unknown}; known: {sorted(SERIES_CONVS)}")
    gen = torch.Generator().manual_seed(0)
    fitted: dict[tuple[int, int], list[dict]] = {}  # with --distinct: one conv per shape, shared by the networks
    how = "estimated: one conv per distinct shape, times its count" if args.distinct else "measured: every conv"
    load_at_start = os.getloadavg()
    for net in nets:
        fits, total = [], 0.0
        for c_out, c_in in SERIES_CONVS[net]:
            layer = fitted.get((c_out, c_in)) if args.distinct else None
            if layer is None:
                w = he_weight(c_out, c_in, gen)
                layer = []
                for g in [2**j for j in range(c_in.bit_length())]:
                    fit = timed_fit(functools.partial(btd, **DecomposeConfig().btd), conditioning, w, g)
                    fit.update(c_out=c_out, c_in=c_in, g=g)
                    layer.append(fit)
                    print(json.dumps(fit), flush=True)
                fitted[(c_out, c_in)] = layer
            if not (args.distinct and layer[0] in fits):
                fits += layer
            total += sum(f["time_s"] for f in layer)
        settings = {"network": net, "convs": len(SERIES_CONVS[net]), "how": how,
                    "weights": "random He of the real shapes, float32", "threads": args.threads,
                    "torch": torch.__version__, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
        (out / f"btd_series_{net}.json").write_text(json.dumps({"settings": settings, "total_s": total, "fits": fits}, indent=2) + "\n")
        lines = [f"# gross.btd series of {net}: {total:.0f} s ({how})", ""]
        lines += [f"- {k}: {v}" for k, v in settings.items()]
        lines += ["", "| C_out x C_in | g | time (s) | steps | error | kappa |", "|" + " --- |" * 6]
        lines += [f"| {f['c_out']} x {f['c_in']} | {f['g']} | {f['time_s']:.2f} | {f['steps']} | {f['error']:.4f} "
                  f"| {f['kappa']:.2f} |" for f in fits]
        (out / f"btd_series_{net}.md").write_text("\n".join(lines) + "\n")
        print(f"{net}: {total:.0f} s ({how})", flush=True)


def workers(args: argparse.Namespace, out: Path) -> None:
    """Wall seconds of ``gross.decompose`` of the networks' 3x3 convs with each of ``--workers`` processes.

    One conv per distinct shape, or with ``--every-conv`` every conv (the decompose stage's whole work).
    """
    gen = torch.Generator().manual_seed(0)
    nets = args.series.split(",")
    shapes = [shape for net in nets for shape in SERIES_CONVS[net] if shape[1] <= args.max_channels]
    if not args.every_conv:
        shapes = sorted(set(shapes))
    convs = nn.Sequential(*[nn.Conv2d(c_in, c_out, 3, padding=1, bias=False) for c_out, c_in in shapes])
    with torch.no_grad():
        for conv, (c_out, c_in) in zip(convs, shapes):
            conv.weight.copy_(he_weight(c_out, c_in, gen))
    options = DecomposeConfig().btd
    rows = {}
    for n in args.workers:
        start = time.perf_counter()
        decompose(copy.deepcopy(convs), workers=n, **options)
        rows[n] = time.perf_counter() - start
        print(f"workers {n}: {rows[n]:.1f} s", flush=True)
    settings = {"networks": nets, "convs": f"{'every' if args.every_conv else 'one per distinct shape'}: "
                + ", ".join(f"{c_out}x{c_in}x3x3" for c_out, c_in in shapes), "group sizes": "every power of two",
                "btd": options, "threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                "load_average_at_end": os.getloadavg()}
    stem = f"btd_decompose_{'_'.join(nets)}" if args.every_conv else "btd_series_workers"
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "seconds": rows}, indent=2) + "\n")
    first = next(iter(rows.values()))
    lines = [f"# gross.decompose with workers, {args.threads} threads in all", "", *[f"- {k}: {v}" for k, v in settings.items()], "",
             "| workers | seconds | speed-up over the first row |", "| --- | --- | --- |"]
    lines += [f"| {n} | {t:.1f} | {first / t:.2f}x |" for n, t in rows.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def stopping(args: argparse.Namespace, out: Path) -> None:
    """Time, steps and error of gross.btd at each ``--rtols`` on random He layers (and the paper layers of ``--weights``)."""
    gen = torch.Generator().manual_seed(0)
    he = {c: he_weight(c, c, gen) for c in (128, 512)}
    cases = [(f"he{c}", he[c], g) for c, sizes in ((128, (4, 8, 32)), (512, tuple(int(s) for s in args.sizes.split(",")))) for g in sizes]
    if args.weights:
        layers, _ = load_layers(args.weights, quick=True)
        cases += [(name, w, g) for name, w in layers for g in (4, 16)]
    rtols = [float(r) for r in args.rtols.split(",")]
    rows = []
    for name, w, g in cases:
        for rtol in rtols:
            row = {"layer": name, "c_out": w.shape[0], "c_in": w.shape[1], "g": g, "rtol": rtol,
                   **timed_fit(functools.partial(btd, rtol=rtol), conditioning, w, g)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # How far the error still falls past tol's stop: the creep that rtol cuts short.
    creep = btd(he[128], 8, tol=0, rtol=0, max_iter=args.creep_steps).errors
    marks = sorted({m for m in (0, 50, 100, 157, 300, 600, 1000, 1500, 3000) if m < len(creep)} | {len(creep) - 1})
    settings = {"threads": args.threads, "tol": 1e-5, "torch": torch.__version__, "load_average_at_end": os.getloadavg()}
    (out / "btd_stopping_fits.json").write_text(json.dumps({"settings": settings, "rows": rows, "creep_he128_g8": creep}, indent=1) + "\n")
    lines = ["# gross.btd: the relative stop (rtol) against tol alone", "", *[f"- {k}: {v}" for k, v in settings.items()], "",
             "| layer | g | rtol | time (s) | steps | error | kappa | speed-up vs rtol 0 | error vs rtol 0 |", "|" + " --- |" * 9]
    for r in rows:
        ref = next(x for x in rows if x["layer"] == r["layer"] and x["g"] == r["g"] and x["rtol"] == rtols[0])
        lines.append(f"| {r['layer']} | {r['g']} | {r['rtol']:g} | {r['time_s']:.2f} | {r['steps']} | {r['error']:.4f} | {r['kappa']:.2f} "
                     f"| {ref['time_s'] / r['time_s']:.1f}x | {100 * (r['error'] / ref['error'] - 1):+.2f}% |")
    lines += ["", "He 128x128, g = 8, tol 0 and rtol 0 (error after N steps): "
              + ", ".join(f"{m}: {creep[m]:.4f}" for m in marks)]
    (out / "btd_stopping_fits.md").write_text("\n".join(lines) + "\n")


def _keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


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
    parser.add_argument("--series", help="whole-network series times only: resnet18, vgg16 or both (comma-separated)")
    parser.add_argument("--distinct", action="store_true", help="--series: one conv per distinct shape, counted")
    parser.add_argument("--workers", type=int, nargs="+",
                        help="--series: wall time of gross.decompose of one conv per distinct shape with each of these process counts")
    parser.add_argument("--every-conv", action="store_true", help="--workers: every conv of the networks (the decompose stage's work)")
    parser.add_argument("--max-channels", type=int, default=512, help="--workers: only convs with at most this many input channels")
    parser.add_argument("--stopping", action="store_true", help="gross.btd at each --rtols (He 128 at g 4, 8, 32; He 512 at --sizes)")
    parser.add_argument("--rtols", default="0,5e-4,1e-3,2e-3", help="--stopping: the rtol values, the first the reference")
    parser.add_argument("--creep-steps", type=int, default=1500, help="--stopping: steps of the tol-0 fit that shows the creep")
    parser.add_argument("--profile", action="store_true", help="time per ALS step against its arithmetic (with --against)")
    parser.add_argument("--profile-steps", type=int, default=3, help="--profile: steps timed per case")
    args = parser.parse_args()
    cap = args.cap if args.cap is not None else (5.0 if args.quick else 25.0)

    torch.set_num_threads(args.threads)
    if args.large or args.series or args.profile or args.stopping:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.large:
            large(args, out)
        elif args.profile:
            profile(args, out)
        elif args.stopping:
            stopping(args, out)
        elif args.workers:
            workers(args, out)
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
        "gross": f"gross.btd defaults (tol 1e-5; rtol {RTOL:g} from {RTOL_MIN_WORK} multiply-adds per data product, else 0; "
        f"float32 while the error is above 1% for float32 weights), penalty {args.penalty:g}",
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
    if args.weights and any(k.endswith("conv1.weight") for k in _keys(args.weights)):
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
