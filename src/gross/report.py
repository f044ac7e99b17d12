"""Tables and plots of a search: the Pareto front, the uniform baselines, the best under budgets.

Input rows are dicts with at least ``config`` (a tuple: one group size, or ``"dense"``, per
layer), ``macs`` and ``val_acc``; optional ``test_acc``, ``latency_ms``, ``params`` and ``dense``
(the names of the layers that stay one dense conv, their bottleneck fused back: a sequence, or
one space-separated string as ``results.csv`` holds it). They come from the search as a list, or
from its ``results.csv`` (:func:`read_results`), whose ``val_accuracy`` and ``test_accuracy``
columns are read as ``val_acc`` and ``test_acc``.

Plots use matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure``), so writing
a report neither needs a display nor changes the caller's pyplot backend.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["pareto_front", "read_results", "write_report"]

Row = Mapping[str, object]
Rows = str | os.PathLike | Sequence[Row]

_OPTIONAL = (("test_acc", "test acc"), ("latency_ms", "latency (ms)"), ("params", "params"))
# gross.search writes results.csv with these column names.
_ALIASES = {"val_accuracy": "val_acc", "test_accuracy": "test_acc"}


def _number(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def pareto_front(rows: Sequence[Row], cost_key: str = "macs", score_key: str = "val_acc") -> list[Row]:
    """The rows that no other row beats: none costs no more and scores no less, one strictly.

    Rows without a finite cost or score are ignored. Of rows with the same cost and score only
    the first is kept.

    Parameters
    ----------
    rows : sequence of dict
    cost_key : str
        Lower is better.
    score_key : str
        Higher is better.

    Returns
    -------
    list of dict
        The front, cheapest first (so scores strictly increase along it).
    """
    valid = [r for r in rows if _number(r.get(cost_key)) is not None and _number(r.get(score_key)) is not None]
    # Cheapest first, best first within a cost (stable, so the first of equal rows wins): a row is
    # on the front exactly when it scores more than every cheaper-or-equal row before it.
    ordered = sorted(valid, key=lambda r: (_number(r[cost_key]), -_number(r[score_key])))
    front: list[Row] = []
    for row in ordered:
        if not front or _number(row[score_key]) > _number(front[-1][score_key]):
            front.append(row)
    return front


def _parse_config(text: object) -> tuple:
    if isinstance(text, (tuple, list)):
        return tuple(text)
    tokens = re.findall(r"dense|\d+", str(text))
    if not tokens:
        raise ValueError(f"cannot read a configuration from {text!r}")
    return tuple(t if t == "dense" else int(t) for t in tokens)


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of a search's CSV: ``config`` as a tuple (``"2 32 64"``, ``"(2, 32, 64)"``, ``"2-32-64"``
    all read alike), numeric columns as floats, anything else as text."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "config" not in reader.fieldnames:
            raise ValueError(f"{path}: a results CSV needs a 'config' column, got {reader.fieldnames}")
        rows = []
        for raw in reader:
            row: dict = {}
            for key, value in raw.items():
                number = _number(value)
                row[key] = _parse_config(value) if key == "config" else (number if number is not None else value)
            rows.append(row)
    return rows


def _rows(results: Rows) -> list[dict]:
    rows = read_results(results) if isinstance(results, (str, os.PathLike)) else [dict(r) for r in results]
    for row in rows:
        if "config" not in row:
            raise ValueError(f"every row needs a 'config', got {sorted(row)}")
        row["config"] = _parse_config(row["config"])
        dense = row.get("dense") or ()
        row["dense"] = tuple(dense.split() if isinstance(dense, str) else dense)
        for long, short in _ALIASES.items():
            if long in row and short not in row:
                row[short] = row.pop(long)
    return rows


def _uniform(rows: list[dict], uniform: Mapping[str, Sequence] | Sequence[Sequence] | None) -> dict[str, tuple]:
    if uniform is None:
        found = sorted(
            {r["config"] for r in rows if len(set(r["config"])) == 1 and isinstance(r["config"][0], int)},
            key=lambda c: c[0],
        )
        return {f"uniform {c[0]}": c for c in found}
    if isinstance(uniform, Mapping):
        return {str(label): _parse_config(c) for label, c in uniform.items()}
    configs = [_parse_config(c) for c in uniform]
    return {(f"uniform {c[0]}" if len(set(c)) == 1 else "uniform " + " ".join(map(str, c))): c for c in configs}


def _fmt(value: object, key: str) -> str:
    if key == "dense":
        return ", ".join(value or ())  # type: ignore[arg-type]
    x = _number(value)
    if x is None:
        return "" if value is None or isinstance(value, float) else str(value)
    if key == "macs":
        return f"{x / 1e6:.3f}"
    if key == "params":
        return f"{x / 1e3:.1f}k"
    if key == "gain":
        return f"{x:+.4g}"
    return f"{x:.4g}"


def _header(key: str) -> str:
    return {"macs": "MACs (M)", "val_acc": "val acc", "ms": "measured ms (end to end)", "setup": "measured with",
            "versus": "against the original", "dense": "dense layers"}.get(
        key, dict(_OPTIONAL).get(key, key)
    )


def _table(rows: Sequence[Row], keys: Sequence[str], first: str | None = None) -> list[str]:
    cols = ([first] if first else []) + ["config"] + list(keys)
    lines = ["| " + " | ".join(c if c == first else _header(c) for c in cols) + " |", "|" + " --- |" * len(cols)]
    for row in rows:
        cells = [str(row.get("_label", ""))] if first else []
        cells.append(" ".join(map(str, row["config"])))
        cells += [_fmt(row.get(k), k) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    results: Rows,
    out_dir: str | os.PathLike,
    *,
    uniform: Mapping[str, Sequence] | Sequence[Sequence] | None = None,
    budgets: Mapping[str, float] | None = None,
    networks: Sequence[Mapping] | None = None,
    notes: Sequence[str] = (),
    layer_names: Sequence[str] | None = None,
    title: str = "GroSS search",
    cost_key: str = "macs",
    score_key: str = "val_acc",
) -> Path:
    """Write ``report.md`` and its plots for the evaluated configurations of a search.

    Parameters
    ----------
    results : path to a results CSV, or sequence of dict
        Every evaluated configuration (see the module docstring).
    out_dir : path
        Created if missing. Written: ``report.md``, ``pareto.png`` (score against cost, every
        configuration, the front and the uniform ones marked), ``front_group_sizes.png`` (group
        size per layer along the front) and, when rows have ``latency_ms`` and the cost is not
        latency already, ``latency.png``.
    uniform : dict label -> config, or sequence of configs, optional
        The uniform baselines to mark. Default: every evaluated configuration whose layers all
        have the same group size.
    budgets : dict label -> cost, optional
        Report the best configuration with cost <= each budget. Default: the cost of every
        uniform configuration that was evaluated (the paper's budget rule).
    networks : sequence of dict, optional
        Whole networks measured end to end: ``network`` (label), ``config``, ``val_acc``,
        ``macs``, ``params``, ``ms``, ``setup`` (the runtime, batch size, threads and device it
        was timed with, e.g. ``"onnxruntime, batch 64, 2 threads, cpu"``) and ``versus``
        (against the original, e.g. ``"1.9x slower"``).
    notes : sequence of str
        Sentences shown under the measured networks (what the measurements mean for the user).
    layer_names : sequence of str, optional
        Names of the configuration's layers, for the heatmap and the tables.
    title : str
    cost_key, score_key : str
        Row keys of the cost (lower is better) and the score (higher is better).

    Returns
    -------
    Path
        The written ``report.md``.
    """
    rows = _rows(results)
    if not rows:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(rows, cost_key, score_key)
    if not front:
        raise ValueError(f"no row has both a numeric {cost_key!r} and {score_key!r}")
    by_config = {r["config"]: r for r in rows}
    uniform_configs = _uniform(rows, uniform)
    uniform_rows = [dict(by_config[c], _label=label) for label, c in uniform_configs.items() if c in by_config]
    missing = [label for label, c in uniform_configs.items() if c not in by_config]
    references: dict[str, float | None] = {}
    if budgets is None:
        # The paper's rule: the budget is a uniform configuration's cost, and the gain is over it.
        budgets = {r["_label"]: _number(r.get(cost_key)) for r in uniform_rows if _number(r.get(cost_key)) is not None}
        references = {r["_label"]: _number(r.get(score_key)) for r in uniform_rows}
    keys = [cost_key, score_key] + [k for k, _ in _OPTIONAL if k not in (cost_key, score_key) and any(k in r for r in rows)]
    if any(r["dense"] for r in rows):
        keys.append("dense")

    lines = [f"# {title}", ""]
    lines.append(
        f"{len(rows)} configurations evaluated; {len(front)} on the Pareto front of {_header(score_key)} "
        f"against {_header(cost_key)}."
    )
    if layer_names:
        lines.append(f"Configurations list the group size of: {', '.join(layer_names)}.")
    lines += ["", "## Pareto front", ""] + _table(front, keys)
    if "dense" in keys:
        lines += ["", "dense layers: kept as one dense conv (the bottleneck at that group size fused back: the same "
                      "outputs, the original conv's shape), where that costs less than the bottleneck."]
    if uniform_rows or missing:
        lines += ["", "## Uniform configurations", ""] + _table(uniform_rows, keys, first="label")
        if missing:
            lines += ["", f"Not evaluated: {', '.join(missing)}."]
    if budgets:
        best_rows = []
        for label, budget in budgets.items():
            within = [r for r in front if _number(r[cost_key]) <= budget]
            best = dict(within[-1]) if within else {"config": ("none",)}
            best["_label"] = f"{label} (<= {_fmt(budget, cost_key)})"
            reference = references.get(label)
            if within and reference is not None:
                best["gain"] = _number(best[score_key]) - reference
            best_rows.append(best)
        extra = ["gain"] if references else []
        lines += ["", f"## Best under budget ({_header(cost_key)})", ""]
        lines += _table(best_rows, keys + extra, first="budget")
        if references:
            lines += ["", f"gain: {_header(score_key)} over the uniform configuration that sets the budget."]
    if networks:
        lines += ["", "## Measured networks", ""]
        keys = ["val_acc", "macs", "params", "ms", "setup", "versus"]
        lines += _table([{**n, "_label": n["network"]} for n in networks], keys, first="network")
    for note in notes:
        lines += ["", note]  # one paragraph each
    plots = [_plot_front(rows, front, uniform_rows, out / "pareto.png", cost_key, score_key)]
    plots.append(_plot_sizes(front, out / "front_group_sizes.png", cost_key, layer_names))
    latency_front = pareto_front(rows, "latency_ms", score_key) if cost_key != "latency_ms" else []
    if latency_front:
        plots.append(_plot_front(rows, latency_front, uniform_rows, out / "latency.png", "latency_ms", score_key))
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _axis_value(value: object, key: str) -> float:
    x = _number(value)
    return x / 1e6 if key == "macs" else x


def _plot_front(
    rows: Sequence[Row], front: Sequence[Row], uniform_rows: Sequence[Row], path: Path, cost_key: str, score_key: str
) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    points = [(_axis_value(r.get(cost_key), cost_key), _number(r.get(score_key))) for r in rows]
    points = [(x, y) for x, y in points if x is not None and y is not None]
    ax.scatter(*zip(*points), s=10, color="0.65", label="evaluated", zorder=1)
    fx = [_axis_value(r[cost_key], cost_key) for r in front]
    fy = [_number(r[score_key]) for r in front]
    # A step: a configuration's score stays available at every larger budget.
    ax.step(fx, fy, where="post", color="tab:red", lw=1.2, zorder=2)
    ax.scatter(fx, fy, s=22, color="tab:red", label="Pareto front", zorder=3)
    for row in uniform_rows:
        x, y = _axis_value(row.get(cost_key), cost_key), _number(row.get(score_key))
        if x is None or y is None:
            continue
        ax.scatter([x], [y], marker="D", s=40, color="tab:blue", zorder=4)
        ax.annotate(str(row["_label"]), (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    if uniform_rows:
        ax.scatter([], [], marker="D", s=40, color="tab:blue", label="uniform")
    ax.set_xlabel(_header(cost_key))
    ax.set_ylabel(_header(score_key))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)
    return path


def _plot_sizes(front: Sequence[Row], path: Path, cost_key: str, layer_names: Sequence[str] | None) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    n_layers = max(len(r["config"]) for r in front)
    names = list(layer_names) if layer_names and len(layer_names) == n_layers else [f"layer {i + 1}" for i in range(n_layers)]
    # A layer that stays dense is shown as dense (D), whatever the group size it was fused at.
    front = [{**r, "config": tuple("dense" if n in r.get("dense", ()) else s for n, s in zip(names, r["config"]))} for r in front]
    sizes = [s for r in front for s in r["config"] if isinstance(s, int) and s > 0]
    dense_level = math.log2(max(sizes)) + 1 if sizes else 0.0
    grid = np.full((n_layers, len(front)), np.nan)
    for j, row in enumerate(front):
        for i, s in enumerate(row["config"]):
            # Colour by log2 of the group size (the sizes are powers of two); dense sits above all.
            grid[i, j] = dense_level if s == "dense" else math.log2(s) if isinstance(s, int) and s > 0 else np.nan
    fig = Figure(figsize=(max(4.0, 0.5 * len(front) + 2.0), max(2.5, 0.45 * n_layers + 1.5)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="upper")
    top = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
    for j, row in enumerate(front):
        for i, s in enumerate(row["config"]):
            # Dark text on viridis' bright (high) end, light text elsewhere.
            color = "k" if top > 0 and grid[i, j] > 0.6 * top else "w"
            ax.text(j, i, "D" if s == "dense" else str(s), ha="center", va="center", fontsize=7, color=color)
    ax.set_yticks(range(n_layers), names)
    ax.set_xticks(range(len(front)), [_fmt(r[cost_key], cost_key) for r in front], rotation=90, fontsize=7)
    ax.set_xlabel(f"Pareto front, by {_header(cost_key)}")
    fig.colorbar(image, ax=ax, label="log2 group size (D: dense)")
    fig.savefig(path, dpi=120)
    return path
