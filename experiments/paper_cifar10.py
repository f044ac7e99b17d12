"""The paper's CIFAR-10 experiment (METHOD.md section 8) with gross, end to end, over several seeds.

    python experiments/paper_cifar10.py                                   # the short protocol (2 CPU cores, about 3 h)
    python experiments/paper_cifar10.py -c experiments/paper-cifar10.yaml --seeds 0 1 2 3 4   # the full recipe (a GPU)

One base network and one decomposition; every training after them is repeated per seed (seed k
sets ``reconstruct.seed``, ``finetune.seed`` and ``fixed.*.seed``). Steps, each skipped when its
output exists, so a killed experiment continues where it stopped:

1. ``gross run`` with the configuration, seed 0 (run folder NAME): base training, decomposition
   (independent series), reconstruction and finetuning at the configuration's alpha and sampling
   form, search scoring every configuration on val and test.
2. The same GroSS training for the other seeds (``NAME-seed1`` ...), from NAME's base network and
   decomposition.
3. The sampling temperature: GroSS training at every alpha of ``--alphas`` under every form of
   ``--forms`` (seed 0; ``NAME-alpha0``, ``NAME-alpha8``, ``NAME-alpha8-literal`` ...; the
   configuration's own form has no suffix, and alpha 0 is one space under every form).
4. ``gross fixed`` for every seed: the uniform configurations 1, 4, 16, 32 and the two best
   configurations within the MACs of uniform 4 and of uniform 16, by val accuracy in the
   configuration's GroSS space averaged over the seeds. Seed 0 trains into NAME/fixed/, seed k
   into NAME-seedk/fixed/.
5. The nested series (``NAME-nested``, its own decomposition, seed 0; ``--no-nested`` skips it).
6. Val and test accuracy of every fixed network and of the base network; Tables 2 and 3 as
   mean and standard deviation over the seeds, the sampling forms' evidence, Figure 1 and the
   nested against the independent series: ``--out``/summary.json, tables.md, figure1.png, series.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gross.checkpoint import load_model, read_meta
from gross.config import resolve_config
from gross.macs import count_macs
from gross.sampling import DEFAULT_FORM
from gross.train import evaluate, load_splits, prepare_batches

ROOT = Path(__file__).resolve().parent.parent

# METHOD.md section 8: test accuracy (%) and the configurations the paper's search found.
PAPER_TABLE2 = {"full": 83.88, "32": 83.70, "16": 82.84, "4": 82.09, "1": 81.76}
PAPER_TABLE3 = {
    "uniform:16": {"uniform": 82.83, "gross_uniform": 81.14, "rows": [("2-32-64", 81.72, 83.84, 1.00), ("8-16-64", 81.60, 83.83, 0.99)]},
    "uniform:4": {"uniform": 82.06, "gross_uniform": 80.37, "rows": [("2-4-8", 80.90, 82.76, 0.70), ("2-8-8", 80.89, 82.92, 0.86)]},
}
UNIFORM = (1, 4, 16, 32)
BUDGETS = (4, 16)
FORMS = ("normalised", "literal")


def uniform(size: int) -> str:
    """The configuration with one group size in each of the paper network's three GroSS layers."""
    return "-".join([str(size)] * 3)


def gross(*args: str) -> None:
    cmd = [sys.executable, "-m", "gross.cli", *args]
    print("+ gross " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def space_key(alpha: float, form: str) -> str:
    """The name of a GroSS space by its sampling temperature: alpha4, alpha8-literal, alpha0."""
    return f"alpha{alpha:g}" + ("" if form == DEFAULT_FORM or alpha == 0 else f"-{form}")


def temperature(key: str) -> tuple[float, str]:
    """The inverse of :func:`space_key`: (alpha, form) of a space named alpha4, alpha8-literal, alpha0."""
    alpha, _, form = key.removeprefix("alpha").partition("-")
    return float(alpha), form or DEFAULT_FORM


def scorer(cfg) -> Callable[[torch.nn.Module | Path], dict]:
    """``score(network or saved model path)``: its val and test accuracy (%) and MACs, on ``cfg``'s data (read once)."""
    splits = load_splits(cfg.data)
    shape = tuple(splits.test.images.shape[1:])
    batches = {s: prepare_batches(getattr(splits, s), cfg.data.eval_batch_size, "cpu", cfg.channels_last) for s in ("val", "test")}

    def score(model: torch.nn.Module | Path) -> dict:
        if isinstance(model, Path):
            model, _ = load_model(model, "cpu")
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        row = {s: round(100 * evaluate(model, batches[s]).accuracy, 2) for s in ("val", "test")}
        row["macs"] = count_macs(model, shape).total
        return row

    return score


def space_settings(cfg, key: str) -> dict:
    """The settings of the space named ``key`` (alpha4, alpha8-literal, nested) under configuration ``cfg``."""
    alpha, form = (cfg.finetune.alpha, cfg.finetune.sampling) if key == "nested" else temperature(key)
    f = cfg.finetune
    return {"alpha": alpha, "sampling": form, "nested": key == "nested", "reconstruct": {"epochs": cfg.reconstruct.epochs, "lr": cfg.reconstruct.lr},
            "finetune": {"epochs": f.epochs, "lr": f.lr, "distill": f.distill, "temperature": f.temperature, "sandwich": f.sandwich},
            "btd": cfg.decompose.btd}


def read_space(run: Path) -> dict[str, dict]:
    """A run's search/results.csv as {configuration: {val, test (%), macs}}."""
    with open(run / "search" / "results.csv", newline="") as f:
        return {
            r["config"].replace(",", "-"): {"val": round(100 * float(r["val_accuracy"]), 2), "test": round(100 * float(r["test_accuracy"]), 2),
                                            "macs": int(r["macs"])}
            for r in csv.DictReader(f)
        }


def seed_run(source: Path, target: Path, stages: tuple[str, ...]) -> None:
    """Start a variant's run folder from finished stages of the main run."""
    for stage in stages:
        if not (target / stage / "model.safetensors").is_file():
            shutil.copytree(source / stage, target / stage, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoint.safetensors"))


def best_within(spaces: list[dict[str, dict]], budget_size: int, count: int) -> list[str]:
    """The ``count`` configurations with the highest val accuracy, averaged over ``spaces``, within uniform ``budget_size``'s MACs."""
    macs = {c: r["macs"] for c, r in spaces[0].items()}
    fits = [c for c in macs if macs[c] <= macs[uniform(budget_size)]]
    mean_val = {c: statistics.fmean(s[c]["val"] for s in spaces) for c in fits}
    return sorted(fits, key=lambda c: (-mean_val[c], macs[c]))[:count]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def stage_seconds(run: Path) -> dict[str, float]:
    out = {}
    for stage in ("base", "reconstruct", "gross"):
        path = run / stage / "metrics.jsonl"
        if path.is_file():
            out[stage] = round(sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line), 1)
    if (run / "decompose" / "model.safetensors").is_file():
        seconds = read_meta(run / "decompose" / "model.safetensors").get("seconds")
        if seconds is not None:  # runs of gross fixed before it recorded them have none
            out["decompose"] = round(float(seconds), 1)
    if (run / "search" / "best.json").is_file():
        out["search"] = round(json.loads((run / "search" / "best.json").read_text())["seconds"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="experiments/paper-cifar10-short.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every training after the decomposition (0 is the main run)")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.0, 4.0, 8.0], help="sampling temperatures compared (seed 0)")
    parser.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS, help="sampling forms compared (seed 0)")
    parser.add_argument("--no-nested", action="store_true", help="skip the nested series")
    parser.add_argument("--out", default=None, help="default experiments/results/NAME")
    parser.add_argument("--set", action="append", default=[], help="passed to every gross call")
    args = parser.parse_args()

    cfg = resolve_config([ROOT / args.config], args.set)
    if cfg.reconstruct.alpha != cfg.finetune.alpha or cfg.reconstruct.sampling != cfg.finetune.sampling:
        sys.exit("reconstruct and finetune must sample alike (alpha and sampling) for the spaces to be named by one temperature")
    name, runs, seeds = cfg.name, ROOT / cfg.runs, list(dict.fromkeys(args.seeds))
    main_key = space_key(cfg.finetune.alpha, cfg.finetune.sampling)
    if main_key != space_key(cfg.finetune.alpha, DEFAULT_FORM):
        sys.exit(f"the configuration samples with the {cfg.finetune.sampling} form; the run names assume the default ({DEFAULT_FORM})")
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    common = ["-c", args.config, "-q", *[a for s in args.set for a in ("--set", s)]]
    started = time.time()

    def seed_folder(k: int) -> Path:
        return runs / (name if k == 0 else f"{name}-seed{k}")

    # 1-2. The GroSS space at the configuration's temperature, per seed.
    gross("run", *common, "--set", "reconstruct.seed=0", "--set", "finetune.seed=0")
    main_run = runs / name
    spaces: dict[str, dict[str, dict]] = {main_key: {}}
    for k in seeds:
        run = seed_folder(k)
        if k != 0:
            seed_run(main_run, run, ("base", "decompose"))
            gross("run", *common, "--name", run.name, "--set", f"reconstruct.seed={k}", "--set", f"finetune.seed={k}")
        spaces[main_key][str(k)] = read_space(run)

    # 3. Other temperatures (seed 0, same base and decomposition).
    for alpha in args.alphas:
        for form in args.forms:
            key = space_key(alpha, form)
            if key in spaces:
                continue
            run = runs / f"{name}-{key}"
            seed_run(main_run, run, ("base", "decompose"))
            gross("run", *common, "--name", run.name, *[a for s in ("reconstruct", "finetune")
                                                          for a in ("--set", f"{s}.alpha={alpha}", "--set", f"{s}.sampling={form}")])
            spaces[key] = {"0": read_space(run)}

    # 4. Fixed configurations, every seed: the uniform ones and the two best within each budget.
    main_spaces = list(spaces[main_key].values())
    found = {f"uniform:{b}": best_within(main_spaces, b, 2) for b in BUDGETS}
    found_per_seed = {k: {f"uniform:{b}": best_within([s], b, 2) for b in BUDGETS} for k, s in spaces[main_key].items()}
    fixed = list(dict.fromkeys([uniform(s) for s in UNIFORM] + [c for b in found.values() for c in b]))
    diverged: dict[str, list[int]] = {}
    for c in fixed:
        for k in seeds:  # one call each, so that one diverging network does not stop the others
            try:
                gross("fixed", *common, "--name", seed_folder(k).name, "--config", c.replace("-", ","),
                      "--set", f"fixed.reconstruct.seed={k}", "--set", f"fixed.finetune.seed={k}")
            except subprocess.CalledProcessError:
                diverged.setdefault(c, []).append(k)

    # 5. The nested series.
    if not args.no_nested:
        run = runs / f"{name}-nested"
        seed_run(main_run, run, ("base",))
        gross("run", *common, "--name", run.name, "--set", "decompose.nested=true")
        spaces["nested"] = {"0": read_space(run)}

    # 6. Val and test accuracy of the fixed networks and the base network.
    score = scorer(cfg)

    base = score(main_run / "base" / "model.safetensors")
    fixed_scores: dict[str, dict] = {}
    for c in fixed:
        per_seed = {str(k): score(seed_folder(k) / "fixed" / c / "gross" / "model.safetensors") for k in seeds if k not in diverged.get(c, [])}
        if per_seed:
            fixed_scores[c] = {"macs": next(iter(per_seed.values()))["macs"],
                               **{s: {k: r[s] for k, r in per_seed.items()} for s in ("val", "test")}}

    summary = {
        "config": args.config,
        "overrides": args.set,
        "recipe": cfg.recipe,
        "seeds": seeds,
        "main_space": main_key,  # the configuration's temperature; the other spaces ran with seed 0 only
        "base": base,
        "fixed": fixed_scores,  # {configuration: {macs, val: {seed: %}, test: {seed: %}}}
        "fixed_diverged": diverged,  # training stopped on a non-finite loss (gross fixed's message above)
        "found": found,  # by val accuracy averaged over the main space's seeds
        "found_per_seed": found_per_seed,  # what the search of each seed's space alone picks
        "gross": spaces,  # {space: {seed: {configuration: {val, test, macs}}}}
        "space_settings": {key: space_settings(cfg, key) for key in spaces},  # how each space was decomposed and trained
        # Runs seeded from the main run list its base (and decomposition) seconds again.
        "stage_seconds": {p.name: stage_seconds(p) for p in sorted(runs.glob(f"{name}*")) if p.is_dir()},
        "fixed_stage_seconds": {f"{c}/seed{k}": stage_seconds(seed_folder(k) / "fixed" / c) for c in fixed_scores for k in fixed_scores[c]["test"]},
        "seconds_this_call": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "tables.md").write_text(tables(summary))
    figures(summary, out)
    print(f"wrote {out}/summary.json, tables.md, figure1.png, series.png")


def gaps(s: dict, key: str, split: str) -> dict[str, float]:
    """GroSS minus trained alone (percentage points) per retrained configuration: each averaged over its seeds."""
    space = s["gross"][key]
    return {c: statistics.fmean(space[k][c][split] for k in space) - statistics.fmean(f[split].values())
            for c, f in s["fixed"].items()}


def paired(s: dict, a: str, b: str) -> list[float]:
    """Per-seed differences of the trained-alone test accuracy of configurations a and b (seeds both have)."""
    ta, tb = s["fixed"][a]["test"], s["fixed"][b]["test"]
    return [ta[k] - tb[k] for k in ta if k in tb]


def verdict(diffs: list[float]) -> str:
    """A difference smaller than its spread over the seeds is no difference."""
    m, sd = mean_std(diffs)
    if math.isnan(sd) or abs(m) <= sd:
        return "no difference"
    return "better" if m > 0 else "worse"


def tables(s: dict) -> str:
    main, fx, n = s["main_space"], s["fixed"], len(s["seeds"])
    g = s["gross"][main]

    def inside(c: str, split: str = "test") -> list[float]:
        return [g[k][c][split] for k in g]

    lines = [
        f"Seeds: {s['seeds']}. Accuracies in %, mean ± sample standard deviation over the seeds; MACs counted analytically.",
        "",
        f"Table 2: the base network and the uniform configurations trained on their own; the same configurations inside the GroSS space ({main}).",
        "",
        "| network | MACs (M) | trained alone, test | trained alone, val | inside GroSS, test | GroSS - alone, test | paper: alone (GroSS) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| full | {s['base']['macs'] / 1e6:.3f} | {s['base']['test']:.2f} | {s['base']['val']:.2f} | - | - | {PAPER_TABLE2['full']:.2f} |",
    ]
    for size in sorted(UNIFORM, reverse=True):
        c = uniform(size)
        paper_g = PAPER_TABLE3.get(f"uniform:{size}", {}).get("gross_uniform")
        paper = f"{PAPER_TABLE2[str(size)]:.2f}" + (f" ({paper_g:.2f})" if paper_g else "")
        gap = [g[k][c]["test"] - fx[c]["test"][k] for k in g if k in fx[c]["test"]]
        lines.append(f"| uniform {size} | {fx[c]['macs'] / 1e6:.3f} | {fmt(list(fx[c]['test'].values()))} | {fmt(list(fx[c]['val'].values()))} | "
                     f"{fmt(inside(c))} | {fmt(gap)} | {paper} |")
    lines += [
        "",
        f"Table 3: the two best configurations within each budget (val accuracy inside GroSS, {main}, averaged over the seeds), retrained on their own",
        "with every seed. The margin is the per-seed difference from the uniform configuration trained alone with the same seed;",
        "a margin within its standard deviation is reported as no difference.",
        "",
        "| budget | configuration | MACs (M) | inside GroSS, test | trained alone, test | margin over uniform | verdict | paper: configuration, GroSS, alone, margin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in sorted(BUDGETS, reverse=True):
        key, uni = f"uniform:{b}", uniform(b)
        paper = PAPER_TABLE3[key]
        lines.append(f"| {key} | {uni} | {fx[uni]['macs'] / 1e6:.3f} | {fmt(inside(uni))} | {fmt(list(fx[uni]['test'].values()))} | - | - | "
                     f"uniform, {paper['gross_uniform']:.2f}, {paper['uniform']:.2f}, - |")
        for i, c in enumerate(s["found"][key]):
            p = paper["rows"][i]
            ref = f"{p[0]}, {p[1]:.2f}, {p[2]:.2f}, {p[3]:+.2f}"
            if c not in fx:
                lines.append(f"| {key} | {c} | - | {fmt(inside(c))} | diverged | - | - | {ref} |")
                continue
            d = paired(s, c, uni)
            m, sd = mean_std(d)
            lines.append(f"| {key} | {c} | {fx[c]['macs'] / 1e6:.3f} | {fmt(inside(c))} | {fmt(list(fx[c]['test'].values()))} | "
                         f"{m:+.2f} ± {sd:.2f} | {verdict(d)} | {ref} |")
    picks = "; ".join(f"seed {k}: " + ", ".join(f"{b} {' '.join(v)}" for b, v in per.items()) for k, per in s["found_per_seed"].items())
    lines += ["", f"Each seed's space searched alone picks: {picks}."]

    configs = sorted(fx, key=lambda c: fx[c]["macs"])
    lines += [
        "",
        "The sampling temperature: GroSS minus trained alone per retrained configuration (percentage points; GroSS averaged over the",
        f"space's seeds, trained alone over {n} seeds), its spread across configurations, and the rank agreement (the paper: flattest at alpha 4).",
        "",
        "| space | seeds | " + " | ".join(configs) + " | mean (test) | std across configurations (test) | Spearman (test) | std (val) | Spearman (val) |",
        "| --- | --- | " + " | ".join("---" for _ in configs) + " | --- | --- | --- | --- | --- |",
    ]
    for key in s["gross"]:
        space = s["gross"][key]
        row = [f"| {key} | {len(space)} |"]
        gt, gv = gaps(s, key, "test"), gaps(s, key, "val")
        row += [f" {gt[c]:+.2f} |" for c in configs]
        row.append(f" {statistics.fmean(gt.values()):+.2f} | {statistics.stdev(gt.values()):.2f} | {rank_agreement(s, key, 'test'):.2f} |"
                   f" {statistics.stdev(gv.values()):.2f} | {rank_agreement(s, key, 'val'):.2f} |")
        lines.append("".join(row))

    lines += ["", "Every GroSS space (test %, all configurations; per seed):", "",
              "| space | seed | mean | min | max | uniform 1 | uniform 4 | uniform 16 | uniform 32 | best val within uniform:4 | best val within uniform:16 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, per_seed in s["gross"].items():
        for k, rows in per_seed.items():
            tests = [r["test"] for r in rows.values()]
            best = [best_within([rows], b, 1)[0] for b in BUDGETS]
            uni = " | ".join(f"{rows[uniform(u)]['test']:.2f}" for u in UNIFORM)
            lines.append(f"| {key} | {k} | {statistics.fmean(tests):.2f} | {min(tests):.2f} | {max(tests):.2f} | {uni} | "
                         + " | ".join(f"{c}: {rows[c]['test']:.2f}" for c in best) + " |")
    return "\n".join(lines) + "\n"


def rank_agreement(s: dict, key: str, split: str) -> float:
    """Spearman correlation of GroSS accuracy (mean over the space's seeds) and trained-alone accuracy (mean over seeds)."""
    space, configs = s["gross"][key], list(s["fixed"])
    inside = [statistics.fmean(space[k][c][split] for k in space) for c in configs]
    alone = [statistics.fmean(s["fixed"][c][split].values()) for c in configs]
    return spearman(inside, alone)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        return torch.tensor([(t < v).sum().item() + ((t == v).sum().item() + 1) / 2 for v in t.tolist()], dtype=torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def figures(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fx = s["fixed"]
    configs = sorted(fx, key=lambda c: fx[c]["macs"])
    # alpha 0 is one space under every form, so it belongs to every panel.
    spaces = {k: temperature(k) for k in s["gross"] if k.startswith("alpha")}
    panels = [(form, sorted((k for k, (alpha, f) in spaces.items() if f == form or alpha == 0), key=lambda k: spaces[k][0]))
              for form in FORMS]
    panels = [(form, keys) for form, keys in panels if len(keys) > 1 or form == DEFAULT_FORM]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (form, keys) in zip(axes[0], panels):
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            space = s["gross"][key]
            # Each seed's gap against the trained-alone network of the same seed; a one-seed space
            # is compared with every trained-alone seed, so its bar carries their spread.
            per_seed = [[space.get(k, space["0"])[c]["test"] - fx[c]["test"][k] for k in fx[c]["test"]] for c in configs]
            mean = [statistics.fmean(v) for v in per_seed]
            err = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed]
            label = f"alpha = {spaces[key][0]:g}" + (f" ({len(space)} seeds)" if len(space) > 1 else "")
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(configs))], mean, width, yerr=err, capsize=2, label=label)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(configs)), [f"{c}\n{fx[c]['macs'] / 1e6:.2f}M" for c in configs], fontsize=7)
        ax.set_title(f"{form} sampling" + (" (chosen)" if form == DEFAULT_FORM else ""), fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("GroSS - trained alone (test acc, pp)")
    fig.suptitle(f"Figure 1: accuracy inside GroSS relative to separate training ({len(s['seeds'])} seeds trained alone; bars: std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "figure1.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in ((s["main_space"], "independent series"), ("nested", "nested series")):
        if key in s["gross"]:
            rows = s["gross"][key]["0"].values()
            ax.scatter([r["macs"] / 1e6 for r in rows], [r["test"] for r in rows], s=9, alpha=0.6, label=f"{label} (seed 0)")
    stats = [mean_std(list(fx[c]["test"].values())) for c in configs]
    ax.errorbar([fx[c]["macs"] / 1e6 for c in configs], [m for m, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd in stats],
                fmt="*", ms=10, color="black", capsize=3, label="trained alone (mean ± std)")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Every configuration of the GroSS space ({s['main_space']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "series.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
