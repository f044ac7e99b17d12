"""The paper's CIFAR-10 experiment (METHOD.md section 8) with gross, end to end.

    python experiments/paper_cifar10.py                                   # the short protocol (2 CPU cores, < 2 h)
    python experiments/paper_cifar10.py -c experiments/paper-cifar10.yaml # the full recipe (a GPU)

Steps, each skipped when its output exists (so a killed experiment continues where it stopped):

1. ``gross run`` with the configuration: base training, decomposition (independent series),
   reconstruction, finetuning at the configuration's alpha, search scoring all 252
   configurations on val and test.
2. The same GroSS training at the other alphas (``--alphas``, default 0 4 8), sharing the base
   network and the decomposition (run folders ``NAME-alpha0`` ...), and with the nested series
   (``NAME-nested``, its own decomposition).
3. ``gross fixed``: the uniform configurations 1, 4, 16, 32 and, for every alpha, the two best
   configurations (by val accuracy in that GroSS space) within the MACs of uniform 4 and of
   uniform 16, each decomposed, reconstructed and finetuned on its own.
4. Test accuracy of every fixed network and of the base network; Tables 2 and 3 of the paper,
   Figure 1 (GroSS accuracy minus the separately trained accuracy, per alpha) and the nested
   against the independent series, written to ``--out`` as summary.json, tables.md,
   figure1.png and series.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gross.checkpoint import load_model, read_meta
from gross.config import resolve_config
from gross.macs import count_macs
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


def uniform(size: int) -> str:
    """The configuration with one group size in each of the paper network's three GroSS layers."""
    return "-".join([str(size)] * 3)


def gross(*args: str) -> None:
    cmd = [sys.executable, "-m", "gross.cli", *args]
    print("+ gross " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def read_results(run: Path) -> dict[str, dict]:
    with open(run / "search" / "results.csv", newline="") as f:
        return {row["config"].replace(",", "-"): row for row in csv.DictReader(f)}


def seed_run(source: Path, target: Path, stages: tuple[str, ...]) -> None:
    """Start a variant's run folder from finished stages of the main run."""
    for stage in stages:
        if not (target / stage / "model.safetensors").is_file():
            shutil.copytree(source / stage, target / stage, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoint.safetensors"))


def best_within(results: dict[str, dict], budget_size: int, count: int) -> list[str]:
    limit = int(results[uniform(budget_size)]["macs"])
    fits = [r for r in results.values() if int(r["macs"]) <= limit]
    fits.sort(key=lambda r: (-float(r["val_accuracy"]), int(r["macs"])))
    return [r["config"].replace(",", "-") for r in fits[:count]]


def stage_seconds(run: Path) -> dict[str, float]:
    out = {}
    for stage in ("base", "reconstruct", "gross"):
        path = run / stage / "metrics.jsonl"
        if path.is_file():
            out[stage] = round(sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line), 1)
    if (run / "decompose" / "model.safetensors").is_file():
        seconds = read_meta(run / "decompose" / "model.safetensors").get("seconds")
        if seconds is not None:  # gross fixed does not record it
            out["decompose"] = round(float(seconds), 1)
    if (run / "search" / "best.json").is_file():
        out["search"] = round(json.loads((run / "search" / "best.json").read_text())["seconds"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="experiments/paper-cifar10-short.yaml")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.0, 4.0, 8.0])
    parser.add_argument("--no-nested", action="store_true", help="skip the nested series")
    parser.add_argument("--out", default=None, help="default experiments/results/NAME")
    parser.add_argument("--set", action="append", default=[], help="passed to every gross call")
    args = parser.parse_args()

    cfg = resolve_config([ROOT / args.config], args.set)
    name, runs = cfg.name, ROOT / cfg.runs
    main_run = runs / name
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    common = ["-c", args.config, "-q", *[a for s in args.set for a in ("--set", s)]]
    started = time.time()

    # 1. The GroSS pipeline at the configuration's alpha.
    gross("run", *common)
    results = {cfg.finetune.alpha: read_results(main_run)}

    # 2. Other alphas (same base and decomposition) and the nested series.
    nested = None
    for alpha in args.alphas:
        if alpha == cfg.finetune.alpha:
            continue
        run = runs / f"{name}-alpha{alpha:g}"
        seed_run(main_run, run, ("base", "decompose"))
        gross("run", *common, "--name", run.name, "--set", f"reconstruct.alpha={alpha}", "--set", f"finetune.alpha={alpha}")
        results[alpha] = read_results(run)
    if not args.no_nested:
        run = runs / f"{name}-nested"
        seed_run(main_run, run, ("base",))
        gross("run", *common, "--name", run.name, "--set", "decompose.nested=true")
        nested = read_results(run)

    # 3. Fixed configurations: the uniform ones and, for every alpha, the two best within each budget.
    found = {a: {b: best_within(r, b, 2) for b in BUDGETS} for a, r in results.items()}
    fixed = [uniform(s) for s in UNIFORM] + [c for a in found for b in BUDGETS for c in found[a][b]]
    fixed = list(dict.fromkeys(fixed))
    diverged = []
    for c in fixed:  # one call each, so that one diverging network does not stop the others
        try:
            gross("fixed", *common, "--config", c.replace("-", ","))
        except subprocess.CalledProcessError:
            diverged.append(c)

    # 4. Test (and val) accuracy of the fixed networks and the base network.
    splits = load_splits(cfg.data)
    shape = tuple(splits.test.images.shape[1:])
    batches = {s: prepare_batches(getattr(splits, s), cfg.data.eval_batch_size, "cpu", cfg.channels_last) for s in ("val", "test")}

    def score(path: Path) -> dict:
        model, _ = load_model(path, "cpu")
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        row = {s: round(100 * evaluate(model, batches[s]).accuracy, 2) for s in ("val", "test")}
        row["macs"] = count_macs(model, shape).total
        return row

    base = score(main_run / "base" / "model.safetensors")
    fixed_scores = {c: score(main_run / "fixed" / c / "gross" / "model.safetensors") for c in fixed if c not in diverged}

    def space(rows: dict[str, dict]) -> dict[str, dict]:
        """results.csv rows as accuracies in % and MACs, by configuration."""
        return {c: {"val": round(100 * float(r["val_accuracy"]), 2), "test": round(100 * float(r["test_accuracy"]), 2),
                    "macs": int(r["macs"])} for c, r in rows.items()}

    summary = {
        "config": args.config,
        "overrides": args.set,
        "recipe": cfg.recipe,
        "base": base,
        "fixed": fixed_scores,
        "fixed_diverged": diverged,  # training stopped on a non-finite loss (gross fixed's message above)
        "found": {f"alpha{a:g}": {f"uniform:{b}": found[a][b] for b in BUDGETS} for a in found},
        "gross": {f"alpha{a:g}": space(r) for a, r in results.items()} | ({"nested": space(nested)} if nested else {}),
        # Runs seeded from the main run list its base (and decomposition) seconds again.
        "stage_seconds": {p.name: stage_seconds(p) for p in sorted(runs.glob(f"{name}*")) if p.is_dir()},
        "fixed_stage_seconds": {c: stage_seconds(main_run / "fixed" / c) for c in fixed if c not in diverged},
        "seconds_this_call": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "tables.md").write_text(tables(summary, cfg.finetune.alpha))
    figures(summary, out, cfg.finetune.alpha)
    print(f"wrote {out}/summary.json, tables.md, figure1.png, series.png")


def tables(s: dict, alpha: float) -> str:
    g = s["gross"][f"alpha{alpha:g}"]
    fx = s["fixed"]
    lines = [
        "Table 2: test accuracy (%) of the base network and the fixed uniform configurations, each trained on its own;",
        "MACs counted analytically (every conv and linear layer).",
        "",
        "| network | test acc | val acc | MACs (M) | same configuration inside GroSS (test) | paper (median) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| full | {s['base']['test']:.2f} | {s['base']['val']:.2f} | {s['base']['macs'] / 1e6:.3f} | - | {PAPER_TABLE2['full']:.2f} |",
    ]
    for size in sorted(UNIFORM, reverse=True):
        c = uniform(size)
        lines.append(f"| fixed {size} | {fx[c]['test']:.2f} | {fx[c]['val']:.2f} | {fx[c]['macs'] / 1e6:.3f} | {g[c]['test']:.2f} | {PAPER_TABLE2[str(size)]:.2f} |")
    for key_alpha in s["found"]:
        g = s["gross"][key_alpha]
        lines += [
            "",
            f"Table 3 ({key_alpha.replace('alpha', 'alpha ')}): the two best configurations (val accuracy inside GroSS) within each budget, retrained on their own.",
            "",
            "| budget | configuration | MACs (M) | GroSS test acc | trained on its own (test) | vs. the uniform one | paper: configuration, GroSS, own, vs. uniform |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for b in sorted(BUDGETS, reverse=True):
            key = f"uniform:{b}"
            uni = uniform(b)
            paper = PAPER_TABLE3[key]
            for i, c in enumerate(s["found"][key_alpha][key]):
                p = paper["rows"][i]
                if c not in fx:
                    lines.append(f"| {key} | {c} | {g[c]['macs'] / 1e6:.3f} | {g[c]['test']:.2f} | diverged | - | {p[0]}, {p[1]:.2f}, {p[2]:.2f}, {p[3]:+.2f} |")
                    continue
                lines.append(
                    f"| {key} (fixed {fx[uni]['test']:.2f}; in GroSS {g[uni]['test']:.2f}) | {c} | {g[c]['macs'] / 1e6:.3f} | {g[c]['test']:.2f} | "
                    f"{fx[c]['test']:.2f} | {fx[c]['test'] - fx[uni]['test']:+.2f} | {p[0]}, {p[1]:.2f}, {p[2]:.2f}, {p[3]:+.2f} |"
                )
    lines += [
        "",
        "GroSS accuracy minus the separately trained accuracy (test, percentage points), per alpha (Figure 1):",
        "",
        "| configuration | MACs (M) | fixed | " + " | ".join(k for k in s["gross"]) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in s["gross"]) + " |",
    ]
    for c in sorted(fx, key=lambda c: fx[c]["macs"]):
        cells = [f"{s['gross'][k][c]['test'] - fx[c]['test']:+.2f}" for k in s["gross"]]
        lines.append(f"| {c} | {fx[c]['macs'] / 1e6:.3f} | {fx[c]['test']:.2f} | " + " | ".join(cells) + " |")
    configs = sorted(fx, key=lambda c: fx[c]["macs"])
    cells = [f"{spearman([s['gross'][k][c]['test'] for c in configs], [fx[c]['test'] for c in configs]):.2f}" for k in s["gross"]]
    lines.append("| Spearman rank correlation with the separately trained accuracy | | | " + " | ".join(cells) + " |")
    lines += ["", "Every GroSS space (test accuracy %, all 252 configurations):", "",
              "| space | mean | min | max | uniform 1 | uniform 4 | uniform 16 | uniform 32 | best val within uniform:4 | best val within uniform:16 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, rows in s["gross"].items():
        tests = [r["test"] for r in rows.values()]
        best = []
        for b in BUDGETS:
            limit = rows[uniform(b)]["macs"]
            c = max((c for c in rows if rows[c]["macs"] <= limit), key=lambda c: (rows[c]["val"], -rows[c]["macs"]))
            best.append(f"{c}: {rows[c]['test']:.2f}")
        uni = " | ".join(f"{rows['-'.join([str(u)] * 3)]['test']:.2f}" for u in UNIFORM)
        lines.append(f"| {k} | {sum(tests) / len(tests):.2f} | {min(tests):.2f} | {max(tests):.2f} | {uni} | {best[0]} | {best[1]} |")
    return "\n".join(lines) + "\n"


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        return torch.tensor([(t < v).sum().item() + ((t == v).sum().item() + 1) / 2 for v in t.tolist()], dtype=torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def figures(s: dict, out: Path, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fx = s["fixed"]
    configs = sorted(fx, key=lambda c: fx[c]["macs"])
    alphas = [k for k in s["gross"] if k.startswith("alpha")]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(alphas)
    for j, k in enumerate(alphas):
        diffs = [s["gross"][k][c]["test"] - fx[c]["test"] for c in configs]
        ax.bar([i + (j - (len(alphas) - 1) / 2) * width for i in range(len(configs))], diffs, width, label=k.replace("alpha", "alpha = "))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(configs)), [f"{c}\n{fx[c]['macs'] / 1e6:.2f}M" for c in configs], fontsize=8)
    ax.set_ylabel("GroSS - trained alone (test acc, pp)")
    ax.set_title("Figure 1: accuracy inside the GroSS space relative to separate training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "figure1.png", dpi=120)
    plt.close(fig)

    spaces = [k for k in (f"alpha{alpha:g}", "nested") if k in s["gross"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in spaces:
        rows = s["gross"][k].values()
        label = "independent series" if k.startswith("alpha") else "nested series"
        ax.scatter([r["macs"] / 1e6 for r in rows], [r["test"] for r in rows], s=9, alpha=0.6, label=f"{label} (alpha {alpha:g})")
    ax.scatter([fx[c]["macs"] / 1e6 for c in configs], [fx[c]["test"] for c in configs], marker="*", s=80, color="black", label="trained alone")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Every configuration of the GroSS space")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "series.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
