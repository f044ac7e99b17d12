"""The ``gross`` command: argument parsing and printing around :mod:`gross.pipeline`.

One subcommand per stage, and ``gross run`` for the whole pipeline. Every subcommand resolves
the configuration (defaults, recipe, ``-c FILE``, ``--set KEY=VALUE``, its own flags), calls the
stage functions of :mod:`gross.pipeline` and prints what they return. Errors the user can fix end
with one line on stderr and exit status 1; set ``GROSS_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import __version__
from .checkpoint import atomic_write, load_model
from .config import Config, ConfigError, dump_config, resolve_config
from .latency import DENSE, LatencyTable, describe_setup
from .model import format_config, gross_layers, parse_config
from .pipeline import (
    EXPORT_DIR,
    LATENCY_DIR,
    MODEL,
    SEARCH_DIR,
    STAGE_DIRS,
    STAGES,
    USER_ERRORS,
    Context,
    Row,
    StageError,
    base_arch,
    context,
    decomposed_layers,
    latency_path,
    measured_networks,
    one_line,
    parse_budget,
    predicted_latency,
    ratio,
    run_stages,
    score_configurations,
    search_results,
    select_configurations,
    slower_note,
    stage_decompose,
    stage_export,
    stage_finetune,
    stage_fixed,
    stage_latency,
    stage_reconstruct,
    stage_report,
    stage_search,
    stage_train,
    write_config,
)
from .report import pareto_front
from .runtime import RUNTIMES
from .search import FUSED_LATENCY, AdditiveCost

__all__ = ["main", "build_parser"]


def format_table(rows: Sequence[Row], split: str) -> str:
    head = ("configuration", f"{split} acc %", f"{split} loss", "MACs (M)", "")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.macs, -r.accuracy)):
        config = format_config(r.config) if r.config is not None else "-"
        lines.append((config, f"{100 * r.accuracy:.2f}", f"{r.loss:.4f}", f"{r.macs / 1e6:.3f}", r.label))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:4], widths[1:4])] + [line[4]]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths[:4]))
    return "\n".join(out)


def _rows_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["config", "label", "accuracy", "loss", "macs"])
    for r in rows:
        writer.writerow([format_config(r.config) if r.config else "", r.label, f"{r.accuracy:.6f}", f"{r.loss:.6f}", r.macs])
    return buf.getvalue()


def format_latency(table: LatencyTable) -> str:
    choices = sorted({k for options in table.options for k in options if k != DENSE}) + ([DENSE] if table.has_dense else [])
    head = ["layer", *[str(c) for c in choices]]
    lines = [[name, *[f"{options[c]:.4f}" if c in options else "" for c in choices]] for name, options in zip(table.layers, table.options)]
    lines.append(["rest", f"{table.rest:.4f}"] + [""] * (len(choices) - 1))
    meta = table.meta
    version = f" {meta['runtime_version']}" if "runtime_version" in meta else ""
    title = (f"ms per layer and group size with {describe_setup(table.setup)} "
             f"({table.setup['runtime']}{version} on {meta.get('device_name', meta.get('device', '?'))}):")
    text = title + "\n" + _text_table(head, lines)
    if "anchor" in meta:
        text += (f"\nrest: the network at {'-'.join(meta['anchor']['config'])} timed whole ({meta['anchor']['ms']:.4f} ms) "
                 "less those layers' times, so it also holds what timing layers apart misses")
    return text


def format_export(ctx: Context, summary: dict, folder: str = EXPORT_DIR) -> str:
    out = ctx.run_dir / folder
    setup = summary["latency_setup"]
    m, p, a, ms = summary["macs"], summary["params"], summary["val_accuracy"], summary["latency_ms"]
    fused = f"; fused into one dense conv: {', '.join(summary['fused'])}" if summary["fused"] else ""
    source = {"search": "the search's best", "given": "--config", "export.config": "export.config"}.get(summary["source"], summary["source"])
    lines = [["val acc %", f"{100 * a['original']:.2f}", f"{100 * a['exported']:.2f}", ""]]
    if summary.get("test_accuracy"):
        t = summary["test_accuracy"]
        lines.append(["test acc %", f"{100 * t['original']:.2f}", f"{100 * t['exported']:.2f}", "(reported only)"])
    lines += [
        ["MACs (M)", f"{m['original'] / 1e6:.3f}", f"{m['exported'] / 1e6:.3f}", ratio(m["original"], m["exported"], "fewer", "more")],
        ["params (k)", f"{p['original'] / 1e3:.1f}", f"{p['exported'] / 1e3:.1f}", ratio(p["original"], p["exported"], "fewer", "more")],
        [f"latency (ms, end to end, {describe_setup(setup)})", f"{ms['original']:.3f}", f"{ms['exported']:.3f}",
         ratio(ms["original"], ms["exported"], "faster", "slower")],
    ]
    text = [f"exported {format_config(summary['config'])} ({source}{fused}) -> {out}",
            _text_table(["", "original", "exported", ""], lines, left={0, 3})]
    files = ", ".join(f for f in summary["files"] if f != "summary.json")
    text.append(f"files: {out}/{{{files}}}")
    for part in ("pt2", "onnx"):  # pt2: absent from exports made before it
        if summary.get(part, {}).get("note"):
            text.append(summary[part]["note"])
    if summary.get("fuse_times"):
        text.append(f"fuse auto, by the latency table ({describe_setup(setup)}):")
        for name, t in summary["fuse_times"].items():
            fused = name in summary["fused"]
            why = "the dense conv is faster: one dense conv, same outputs" if fused else "the bottleneck is faster: kept"
            text.append(f"  {name} at group size {t['size']}: bottleneck {t['bottleneck_ms']:.3f} ms, dense conv {t['dense_ms']:.3f} ms; {why}")
    note = slower_note(ctx, summary)
    if note:
        text.append(note)
    return "\n".join(text)


def format_networks(rows: Sequence[dict]) -> str:
    """The original network and the exported choices, measured (:func:`gross.pipeline.measured_networks`)."""
    lines = [[r["network"], format_config(r["config"]) if r["config"] != ("-",) else "-", f"{100 * r['val_acc']:.2f}",
              f"{r['macs'] / 1e6:.3f}", f"{r['params'] / 1e3:.1f}", f"{r['ms']:.3f}", r["setup"], r["versus"]] for r in rows]
    head = ["network", "configuration", "val acc %", "MACs (M)", "params (k)", "measured ms", "measured with", ""]
    return _text_table(head, lines, left={0, 1, 6, 7})


def format_results(ctx: Context, export_summary: dict | None = None) -> str:
    """The Pareto front of val accuracy against MACs, the uniform configurations and the chosen one."""
    rows, labels, best = search_results(ctx)
    chosen = tuple(best["best"]["config"]) if best.get("best") else None
    front = {r["config"] for r in pareto_front(rows, "macs", "val_accuracy")}
    shown = [r for r in rows if r["config"] in front or r["config"] in labels or r["config"] == chosen]
    table = predicted_latency(ctx, best.get("layers", []))
    fused = best.get("cost") == FUSED_LATENCY  # chosen counting each layer at the faster of bottleneck and dense conv
    predict = AdditiveCost.from_latency_table(table, fuse=fused) if table else None
    test = any("test_accuracy" in r for r in shown)
    head = ["configuration", "val acc %"] + (["test acc %"] if test else []) + ["MACs (M)", "params (k)"] + (["pred. ms"] if table else []) + [""]
    lines = []
    for r in sorted(shown, key=lambda r: (r["macs"], -r["val_accuracy"])):
        notes = []
        if r["config"] == chosen:
            budget = best.get("budget")
            notes.append(f"chosen ({best.get('strategy')}, {'no budget' if budget is None else f'budget {budget}'})")
        if r.get("dense"):
            notes.append(f"dense: {', '.join(str(r['dense']).split())}")
        if r["config"] in front:
            notes.append("pareto")
        if r["config"] in labels:
            notes.append(labels[r["config"]])
        line = [format_config(r["config"]), f"{100 * r['val_accuracy']:.2f}"]
        if test:
            line.append(f"{100 * r['test_accuracy']:.2f}" if "test_accuracy" in r else "")
        line += [f"{r['macs'] / 1e6:.3f}", f"{r['params'] / 1e3:.1f}" if "params" in r else ""]
        if table:
            line.append(f"{predict(r['config']):.3f}")
        lines.append(line + [", ".join(notes)])
    if export_summary:
        e = export_summary
        line = ["original", f"{100 * e['val_accuracy']['original']:.2f}"] + ([""] if test else [])
        line += [f"{e['macs']['original'] / 1e6:.3f}", f"{e['params']['original'] / 1e3:.1f}"] + ([""] if table else [])
        lines.append(line + ["the network before decomposition"])
    predicted = f"; pred. ms: the latency table's prediction ({describe_setup(table.setup)})" if table else ""
    title = (f"{len(rows)} configurations scored on the val split; {len(front)} on the Pareto front of val accuracy "
             f"against MACs{predicted}{', with layers fused where the dense conv is faster' if fused else ''}:")
    return title + "\n" + _text_table(head, lines, left={0, len(head) - 1})


def _text_table(head: Sequence[str], lines: Sequence[Sequence[str]], left: set[int] = frozenset({0})) -> str:
    """Columns padded to their widest cell: those in ``left`` left-aligned, the others right-aligned."""
    rows = [list(head), *[list(line) for line in lines]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def cells(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join(("-" if h else " ") * w for h, w in zip(head, widths)).rstrip()
    return "\n".join([cells(rows[0]), rule, *map(cells, rows[1:])])


# ---------------------------------------------------------------------------------------------
# Command line


CONFIG_HELP = "2,32,64 (group sizes by position) or conv2=2,conv3=32,..."
SETUP_FLAGS = ("runtime", "batch_size")  # the command-line half of latency.*: where latency is measured


def _setup_args(parser: argparse.ArgumentParser) -> None:
    """--runtime and --batch-size, for every command that measures latency."""
    parser.add_argument("--runtime", choices=RUNTIMES, help="where latency is measured: torch (eager) or onnxruntime (needs "
                        "gross[export]); default latency.runtime, torch")
    parser.add_argument("--batch-size", type=int, metavar="B", help="images per timed forward pass (default latency.batch_size, 1)")


def _common(parser: argparse.ArgumentParser, stage: bool = True, force: bool = True, force_help: str | None = None) -> None:
    g = parser.add_argument_group("configuration")
    g.add_argument("--config-file", "-c", metavar="YAML", help="configuration file (default: the run folder's config.yaml when it exists)")
    g.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. train.epochs=3 or decompose.skip=[conv1] (repeatable; values are YAML)")
    g.add_argument("--name", "-n", help="run name: the run folder is RUNS/NAME (same as --set name=NAME)")
    g.add_argument("--runs", help="parent folder of run folders (default runs)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    g.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    if stage:
        g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint.safetensors")
        g.add_argument("--restart", action="store_true", help="start an interrupted stage over, discarding its checkpoint")
    if force:
        g.add_argument("--force", action="store_true", help=force_help or "redo the stage even if its output exists (replaced only on success)")


def _fields_help() -> str:
    import dataclasses

    lines = []
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            names = ", ".join(g.name for g in dataclasses.fields(value))
            lines.append(f"    {f.name}: {names}")
    top = ", ".join(f.name for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(Config(), f.name)))
    return f"    (top level): {top}\n" + "\n".join(lines)


SET_HELP = f"""\
settings:
  Resolved from the defaults (the quick run on digits), then the recipe (recipe=authors: the
  released code's CIFAR recipe; recipe=paper: the paper's literal text), then the YAML file, then
  --set KEY=VALUE overrides (values are YAML), e.g.

    gross run --set train.epochs=3 --set decompose.skip=[conv1]
    gross run -c experiments/paper-cifar10.yaml --set recipe=paper --name paper-text
    gross run --print-config                  # the resolved settings, with every key

  Keys (each commented in gross/config.py; unknown keys are errors):
{_fields_help()}

  A killed run continues with the same command plus --resume (finished stages are skipped).
"""

SEARCH_HELP = """search:
  The finetuned GroSS network (gross/) is scored at many configurations on the validation
  split; the best within the budget is chosen (the test split is never used to choose; --test
  only adds its accuracy to the table). Every scored configuration is appended to
  search/results.csv as it goes, so running the command again continues an interrupted search,
  and a search with other settings (another budget or strategy) takes the scores already there.
  search/best.json is the summary (its "finished" says whether the search ended), and
  search/uniform.csv scores the uniform configurations (each layer at the largest group size
  <= G), the paper's baselines, whether or not they fit the budget.

  Strategies: exhaustive scores every configuration within the budget (the paper's search);
  beam extends the best --beam-width partial configurations layer by layer; evolution breeds
  --max-evaluations configurations from a population (seeded by --seed). auto (the default)
  counts the configurations that fit the budget first: exhaustive when at most
  search.max_configs (5000) fit, else beam.

  Cost: MACs of one image, or with --latency the predicted ms of a latency table measured by
  `gross latency` on the runtime, batch size and device the network will run on (the latency.*
  settings, threads and device must match the table's).
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gross", description="GroSS: group-size series decomposition, whole search-space training, search and export.",
        epilog="Run `gross COMMAND --help` for a command's options and settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gross {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("run", help="the whole pipeline: train, decompose, reconstruct, finetune, search, export, report",
                       description=_wrap("Run every stage in order, skipping those whose output exists (so a killed run continues "
                       "where it stopped): train (base/), decompose, reconstruct, finetune (gross/), search (search/: the "
                       "search.* settings; by default every configuration within the MACs of uniform group size 16 when at most "
                       "5000 fit, else a beam search), export of the chosen configuration (export/: the export.* settings, with "
                       "ONNX), report (report.md and plots). Prints the Pareto front, the uniform configurations and the chosen "
                       "one with their val accuracy and MACs, then where the exported files are. With no arguments: the quick run "
                       "on the embedded digits dataset."), epilog=SET_HELP, formatter_class=fmt)
    _common(p, force=False)
    for name, helptext in [
        ("train", "base training of the original network (-> base/)"),
        ("decompose", "decompose the trained network into GroSS layers (-> decompose/)"),
        ("reconstruct", "response reconstruction of the GroSS layers (-> reconstruct/)"),
        ("finetune", "finetune the whole space with sampled group sizes (-> gross/)"),
    ]:
        p = sub.add_parser(name, help=helptext, description=helptext, epilog=SET_HELP, formatter_class=fmt)
        _common(p)

    p = sub.add_parser("search", help="find the best configuration within a budget (-> search/)",
                       description=_wrap("Search the finetuned GroSS network's configurations for the best val accuracy within a "
                       "budget; writes search/results.csv, best.json and uniform.csv and prints the Pareto front."),
                       epilog=SEARCH_HELP + "\n" + SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force_help="start the search over, discarding the scores in search/")
    g = p.add_argument_group("search")
    g.add_argument("--strategy", choices=["auto", "exhaustive", "beam", "evolution"], help="default search.strategy (auto)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--budget", metavar="B", help="largest cost: uniform:G (the cost of every layer at group size G; default "
                        "uniform:16), a number in the cost's units, or none")
    budget.add_argument("--max-macs", type=float, metavar="N", help="largest MACs of one image (cost MACs)")
    budget.add_argument("--max-ms", type=float, metavar="X", help="largest predicted latency in ms (cost latency; needs the table)")
    g.add_argument("--latency", nargs="?", const="", metavar="TABLE.json", help="cost: predicted ms of a latency table "
                   "(default RUN/latency/table.json, written by `gross latency`) instead of MACs")
    g.add_argument("--test", action="store_true", help="also measure test accuracy (reported only; never used to choose)")
    g.add_argument("--beam-width", type=int, metavar="K", help="beam: configurations kept per layer (default 4)")
    g.add_argument("--max-evaluations", type=int, metavar="N", help="evolution: configurations scored (default 100)")
    g.add_argument("--seed", type=int, metavar="S", help="evolution: seed (default 0)")
    g.add_argument("--max-configs", type=int, metavar="N", help="exhaustive: most configurations scored (default 5000; auto: beam above it)")

    p = sub.add_parser("latency", help="choose by measured latency where the network will run, beside the choice by MACs (-> latency/)",
                       description=_wrap("Time every GroSS layer of the finetuned network at every group size, as the three convs it "
                       "exports to, and as the original dense conv, plus the rest of the network, on a runtime (--runtime: torch "
                       "eager, or onnxruntime, each as its own small ONNX graph in an InferenceSession) at a batch size "
                       "(--batch-size) with the run's threads (--set threads=N) on its device (--device), into "
                       "latency/table.json, which records all four (kept when it exists and was measured the same way; "
                       "measured again otherwise or with --force). Then search for the most accurate "
                       "configuration within a latency budget (--max-ms; default: the original network's predicted latency), each "
                       "layer costing the faster of its bottleneck and the dense conv (latency/search/), export it with those "
                       "layers fused (latency/export/), and print it beside the network chosen by MACs (export/) and the "
                       "original, with val accuracy, MACs, parameters and latency measured end to end on the same runtime and "
                       "batch size; report.md gets the same table. `gross search --latency` and `gross export --fuse auto` use "
                       "the table too, and refuse one measured on another runtime, batch size, thread count or device."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force_help="measure the latency table again")
    p.add_argument("--max-ms", type=float, metavar="X", help="latency budget in predicted ms (default: the original network's)")
    _setup_args(p)
    p.add_argument("--repeats", type=int, metavar="N", help="timed samples per candidate (default latency.repeats, 100)")
    p.add_argument("--out", type=Path, metavar="TABLE.json", help="write here (default search.latency_table: RUN/latency/table.json)")

    p = sub.add_parser("export", help="the plain network at one configuration (-> export/)",
                       description=_wrap("Export the finetuned GroSS network at one configuration as standard convs: "
                       "export/net.safetensors + net.json (load with gross.load), net.onnx (checked against torch with "
                       "onnxruntime when installed), summary.json. Prints MACs, parameters, val accuracy and latency measured end to "
                       "end on --runtime at --batch-size of the exported network against the original one."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", metavar="SIZES", help=f"{CONFIG_HELP}; 0 is the original dense conv "
                       "(other layers at their largest size)")
    which.add_argument("--best", action="store_true", help="the search's best, from search/best.json (the default unless export.config is set)")
    p.add_argument("--fuse", choices=["auto", "none", "all"], help="bottlenecks exported as one dense conv of the same outputs: none "
                   "(default export.fuse), auto (where the latency table says the dense conv is faster on this runtime and device; "
                   "measured when missing) or all")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=None, help="write net.onnx (default export.onnx, yes)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default export.opset, 18)")
    _setup_args(p)

    p = sub.add_parser("report", help="report.md and plots of the search (and export)",
                       description=_wrap("Write RUN/report.md with pareto.png and front_group_sizes.png (latency.png with a latency "
                       "table): the Pareto front, the uniform configurations, the best within the MACs of uniform:4 and "
                       "uniform:16, and the exported network's measured latency against the original's when export/ exists."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force=False)

    p = sub.add_parser("fixed", help="train one configuration on its own (decompose, reconstruct, finetune)",
                       description=_wrap("Decompose the base network at one group size per layer, reconstruct and finetune it "
                       "with the fixed.* settings, into fixed/<config>/."), epilog=SET_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("--config", action="append", default=[], metavar="SIZES", help=f"{CONFIG_HELP} (repeatable; default fixed.configs)")
    p.add_argument("--uniform", action="append", type=int, default=[], metavar="SIZE", help="the same group size in every layer (repeatable)")
    p = sub.add_parser("evaluate", help="accuracy and MACs of configurations of a trained model",
                       description=_wrap("Evaluate a stage's model (default the finetuned GroSS network) at configurations."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force=False)
    p.add_argument("--stage", default="finetune", choices=["train", "decompose", "reconstruct", "finetune"], help="whose model.safetensors to evaluate (default finetune)")
    p.add_argument("--checkpoint", type=Path, help="evaluate this model.safetensors instead")
    p.add_argument("--config", action="append", default=[], metavar="SIZES", help=f"{CONFIG_HELP} (repeatable)")
    p.add_argument("--uniform", action="store_true", help="every uniform configuration")
    p.add_argument("--samples", type=int, help="this many random configurations")
    p.add_argument("--split", choices=["val", "test"], help="default evaluate.split (val)")
    p.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[dict]:
    """The command's own flags as settings, applied after --set.

    Only ``gross run`` and the training stages write config.yaml; search, latency and export
    record the settings they used in their own output (search/source.json, the latency table's
    meta, export/summary.json), so a flag given to one of them applies to that call only.
    """
    out: list[dict] = []
    if args.command == "search":
        search: dict[str, Any] = {}
        if args.strategy:
            search["strategy"] = args.strategy
        if args.budget is not None:
            search["budget"] = parse_budget(args.budget)
        if args.max_macs is not None:
            if args.latency is not None:
                raise StageError("--max-macs is a MACs budget; drop --latency or use --max-ms")
            search.update(budget=args.max_macs, cost="macs")
        if args.max_ms is not None:
            search.update(budget=args.max_ms, cost="latency")
        if args.latency is not None:
            search["cost"] = "latency"
            if args.latency:
                search["latency_table"] = str(Path(args.latency).resolve())
        for key in ("beam_width", "max_evaluations", "seed", "max_configs"):
            if getattr(args, key) is not None:
                search[key] = getattr(args, key)
        if args.test:
            search["test"] = True
        out.append({"search": search})
    elif args.command == "latency":
        out.append({"latency": {k: getattr(args, k) for k in (*SETUP_FLAGS, "repeats") if getattr(args, k) is not None}})
    elif args.command == "export":
        out.append({"export": {k: getattr(args, k) for k in ("fuse", "onnx", "opset") if getattr(args, k) is not None}})
        out.append({"latency": {k: getattr(args, k) for k in SETUP_FLAGS if getattr(args, k) is not None}})
    return out


def _resolve(args: argparse.Namespace) -> Config:
    overrides: list[Any] = list(args.overrides)
    for key in ("name", "runs", "device"):
        if getattr(args, key, None):
            overrides.append(f"{key}={getattr(args, key)}")
    overrides += _flag_overrides(args)
    files = [args.config_file] if args.config_file else []
    cfg = resolve_config(files, overrides)
    existing = cfg.run_dir / "config.yaml"
    if not args.config_file and existing.is_file():
        try:
            cfg = resolve_config([existing], overrides)
        except ConfigError as err:
            raise ConfigError(f"{existing} (this run's settings, read because no --config-file was given): {err}; "
                              f"fix it there, override it with --set, or delete it") from None
    return cfg


def _context(args: argparse.Namespace, cfg: Config) -> Context:
    return context(
        cfg, resume=getattr(args, "resume", False), restart=getattr(args, "restart", False), force=getattr(args, "force", False),
        progress=not args.quiet and sys.stderr.isatty(),  # redirected, bars would only fill the file with \r
    )


def _cmd_run(ctx: Context) -> None:
    start = time.perf_counter()
    result = run_stages(ctx)
    if ctx.lead:
        print(format_results(ctx, result.export), flush=True)
        print("", flush=True)
        print(format_export(ctx, result.export), flush=True)
        print(f"report: {result.report}", flush=True)
        ctx.log(f"[run] {ctx.run_dir} in {time.perf_counter() - start:.0f}s")


def _cmd_search(ctx: Context) -> None:
    stage_search(ctx)
    if ctx.lead:
        print(format_results(ctx), flush=True)
        ctx.log(f"[search] rows in {ctx.run_dir / SEARCH_DIR / 'results.csv'}, summary in {ctx.run_dir / SEARCH_DIR / 'best.json'}")


def _cmd_latency(ctx: Context, args: argparse.Namespace) -> None:
    path = args.out.resolve() if args.out else latency_path(ctx)
    summary = stage_latency(ctx, path, budget_ms=args.max_ms)
    report = stage_report(ctx) if (ctx.run_dir / SEARCH_DIR / "results.csv").is_file() else None
    if ctx.lead:
        print(format_latency(LatencyTable.load(path)), flush=True)
        print("", flush=True)
        print(format_export(ctx, summary, f"{LATENCY_DIR}/{EXPORT_DIR}"), flush=True)
        print("", flush=True)
        print(format_networks(measured_networks(ctx)), flush=True)
        if report is not None:
            print(f"report: {report}", flush=True)


def _cmd_export(ctx: Context, args: argparse.Namespace) -> None:
    config = parse_config(args.config) if args.config else None
    summary = stage_export(ctx, config, best=args.best)
    if ctx.lead and summary is not None:
        print(format_export(ctx, summary), flush=True)


def _cmd_report(ctx: Context) -> None:
    path = stage_report(ctx)
    if ctx.lead:
        print(f"report: {path}", flush=True)


def _cmd_fixed(ctx: Context, args: argparse.Namespace) -> None:
    configs: list[Any] = [parse_config(c) for c in args.config]
    if args.uniform:
        names = decomposed_layers(ctx, "--uniform")
        configs += [{n: s for n in names} for s in args.uniform]
    if not configs:
        configs = [tuple(c) for c in ctx.cfg.fixed.configs]
    if not configs:
        raise StageError("no configuration given: pass --config 2,32,64, --uniform 4 or set fixed.configs")
    write_config(ctx)
    for config in configs:
        root = stage_fixed(ctx, config)
        if ctx.lead:
            model, _ = load_model(root / STAGE_DIRS["finetune"] / MODEL, ctx.device)
            rows = score_configurations(ctx, model, [("fixed", tuple(m.group_size for _, m in gross_layers(model)))], ctx.cfg.evaluate.split)
            print(format_table(rows, ctx.cfg.evaluate.split), flush=True)


def _cmd_evaluate(ctx: Context, args: argparse.Namespace) -> None:
    if not ctx.lead:
        return
    split = args.split or ctx.cfg.evaluate.split
    path = args.checkpoint or ctx.run_dir / STAGE_DIRS[args.stage] / MODEL
    if not path.is_file():
        raise StageError(f"{path} is missing; run `gross {args.stage}` first or pass --checkpoint")
    model, _ = load_model(path, ctx.device, expect=None if args.checkpoint else base_arch(ctx))
    if gross_layers(model):
        explicit = [parse_config(c) for c in args.config]
        if explicit or args.uniform or args.samples is not None:
            configs = select_configurations(ctx, model, explicit, uniform=args.uniform, samples=args.samples or 0)
        else:
            configs = select_configurations(ctx, model)
        rows = score_configurations(ctx, model, configs, split)
    else:
        if args.config or args.uniform or args.samples:
            raise StageError(f"{path} has no GroSS layers, so it has no configurations to choose")
        rows = score_configurations(ctx, model, [], split)
    print(format_table(rows, split), flush=True)
    if args.out:
        atomic_write(args.out, _rows_csv(rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        cfg = _resolve(args)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        ctx = _context(args, cfg)
        if args.command == "run":
            _cmd_run(ctx)
        elif args.command in STAGES:
            {"train": stage_train, "decompose": stage_decompose, "reconstruct": stage_reconstruct, "finetune": stage_finetune}[args.command](ctx)
            write_config(ctx)
            ctx.log(f"[{args.command}] wrote {ctx.run_dir / STAGE_DIRS[args.command] / MODEL}")
        elif args.command == "search":
            _cmd_search(ctx)
        elif args.command == "latency":
            _cmd_latency(ctx, args)
        elif args.command == "export":
            _cmd_export(ctx, args)
        elif args.command == "report":
            _cmd_report(ctx)
        elif args.command == "fixed":
            _cmd_fixed(ctx, args)
        elif args.command == "evaluate":
            _cmd_evaluate(ctx, args)
    except USER_ERRORS as err:
        if os.environ.get("GROSS_DEBUG"):
            raise
        print(f"gross: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        again = "again" if args.command == "search" else "with --resume"
        print(f"gross: interrupted; run the same command {again} to continue", file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
