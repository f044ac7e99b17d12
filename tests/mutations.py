"""Mutation check: plant known bugs, one at a time, in a copy of the source, and see the tests catch each.

Not a test module (pytest collects ``test_*.py`` only). Run it before large changes::

    python tests/mutations.py              # every mutant
    python tests/mutations.py --list       # names and what each plants
    python tests/mutations.py -k stride    # the mutants whose name contains "stride"

For each mutant the script copies ``src/``, ``tests/`` and ``pyproject.toml`` into a temporary
folder, replaces one exact piece of code there (the working tree is never touched), and runs the
test files that should notice with ``PYTHONPATH`` pointing at the copy. A mutant is

- caught: a test failed that passes without the mutant (each failure is rerun on the unmutated
  copy, so that a test flaky under load catches nothing);
- MISSED: every test passed, or only flaky ones failed (a behaviour no test guards: write one);
- stale: the code it replaces is no longer there (update the mutant);
- error: pytest could not run (exit status other than 0 and 1).

The unmutated copy is run first on the union of the test files; if that fails, nothing else is
meaningful and the script stops. Exit status: 0 when every mutant is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/gross
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, or file::test ids
    why: str


MUTANTS = [
    Mutant(
        "search-budget-edge", "search.py",
        "within = [c for c, r in records.items() if r.cost <= limit]",
        "within = [c for c, r in records.items() if r.cost < limit]",
        ("tests/test_search.py",),
        "the final pick excludes a configuration that costs exactly the budget",
    ),
    Mutant(
        "uniform-budget-below", "search.py",
        "max((s for s in sizes if s <= group_size), default=min(sizes))",
        "max((s for s in sizes if s < group_size), default=min(sizes))",
        ("tests/test_search.py",),
        "uniform:G takes the size below G even where G is valid",
    ),
    Mutant(
        "padding-mode-stride", "series.py",
        "y = F.conv2d(y, core, None, self.stride, 0, self.dilation, self.width // self._group_size)",
        "y = F.conv2d(y, core, None, 1, 0, self.dilation, self.width // self._group_size)",
        ("tests/test_series.py", "tests/test_export.py"),
        "a non-zero padding mode runs the grouped conv at stride 1",
    ),
    Mutant(
        "padding-order", "series.py",
        "return [pw, pw, ph, ph]",
        "return [ph, ph, pw, pw]",
        ("tests/test_series.py", "tests/test_export.py"),
        "F.pad gets the height's padding on the width (and the other way round)",
    ),
    Mutant(
        "stride-on-first-conv", "series.py",
        "        y = F.conv2d(x, first)\n",
        "        y = F.conv2d(x, first, stride=self.stride)\n",
        ("tests/test_series.py", "tests/test_export.py"),
        "the stride also applied by the first pointwise conv, before the padding",
    ),
    Mutant(
        "stride-on-last-conv", "series.py",
        "y = F.conv2d(y, core, None, self.stride, self.padding, self.dilation, self.width // self._group_size)\n"
        "        return F.conv2d(y, last, self.bias)",
        "y = F.conv2d(y, core, None, 1, self.padding, self.dilation, self.width // self._group_size)\n"
        "        return F.conv2d(y, last, self.bias, self.stride)",
        ("tests/test_series.py", "tests/test_macs.py"),
        "the stride moved to the last pointwise conv: the same outputs (subsampling commutes with a 1x1 conv), "
        "the grouped conv's cost at full resolution",
    ),
    Mutant(
        "expand-off-by-one", "expand.py",
        "onehot = (rows[:, None] // g == torch.arange(h // g, device=weight.device)).to(weight.dtype)",
        "onehot = ((rows[:, None] + 1) // g == torch.arange(h // g, device=weight.device)).to(weight.dtype)",
        ("tests/test_expand.py",),
        "expansion puts row j of a block in the sub-block of row j + 1",
    ),
    Mutant(
        "macs-grouped-conv", "macs.py",
        "return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)",
        "return out.numel() * m.in_channels * math.prod(m.kernel_size)",
        ("tests/test_macs.py",),
        "a grouped conv costs what the dense conv costs",
    ),
    Mutant(
        "macs-core-groups", "macs.py",
        "core = pixels_out * m.width * s * kh * kw",
        "core = pixels_out * m.width * (m.width // s) * kh * kw",
        ("tests/test_macs.py",),
        "the grouped conv's MACs use the number of groups for the group size",
    ),
    Mutant(
        "sampling-form-ignored", "train.py",
        "set_config(model, sample_config(model, alpha, sample_gen, sampling))",
        'set_config(model, sample_config(model, alpha, sample_gen, "literal"))',
        ("tests/test_train.py",),
        "training draws with the literal form whatever finetune.sampling says",
    ),
    Mutant(
        "sampling-normalised-index", "sampling.py",
        'logits = -float(alpha) * (index / n if form == "normalised" else index)',
        'logits = -float(alpha) * (index / (n + 1) if form == "normalised" else index)',
        ("tests/test_sampling.py",),
        "the normalised form divides the index by N + 1",
    ),
    Mutant(
        "latency-rest", "latency.py",
        'rest=times[whole] - sum(times[("layer", name, anchor[name])] for name in names),',
        'rest=times[whole] - sum(times[("layer", name, anchor[name])] for name in names[1:]),',
        ("tests/test_latency.py",),
        "the rest keeps the first layer's time",
    ),
    Mutant(
        "checkpoint-unpickles", "checkpoint.py",
        "    except (SafetensorError, OSError, ValueError, RuntimeError) as err:\n        raise _open_error(path, err) from None\n"
        "    return tensors, _parse_meta(path, header)",
        "    except (SafetensorError, OSError, ValueError, RuntimeError) as err:\n        try:\n"
        "            torch.load(path, weights_only=False)\n        except Exception:\n            pass\n"
        "        raise _open_error(path, err) from None\n    return tensors, _parse_meta(path, header)",
        ("tests/test_pickles.py",),
        "a file that is not safetensors is tried with torch.load (which runs its pickle) before the error",
    ),
]


def copy_tree(dest: Path) -> None:
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, list[str], str]:
    """pytest's exit status (None on timeout), the ids of the failed tests, and its last line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree / "src"), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, [], "timeout"
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    failed = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    return done.returncode, failed, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="only", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name:28s} {m.file:14s} {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="gross-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        # Checked in the copy: the tree must be green before its mutants mean anything.
        union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, failed, line = run_tests(tree, union, args.timeout)
        if code != 0:
            print(f"the unmutated tests do not pass ({', '.join(failed) or line}); fix them first", file=sys.stderr)
            return 2
        rows = []
        for m in mutants:
            path = tree / "src" / "gross" / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                rows.append((m, "stale", f"the code to replace occurs {original.count(m.old)} times in {m.file}", 0.0))
                continue
            path.write_text(original.replace(m.old, m.new))
            tick = time.monotonic()
            try:
                code, failed, line = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
            status = {0: "MISSED", 1: "caught", None: "timeout"}.get(code, f"error ({code})")
            if status == "caught":
                # A test that fails without the mutant too (one flaky under load) catches nothing.
                _, flaky, _ = run_tests(tree, tuple(failed), args.timeout)
                failed = [t for t in failed if t not in flaky]
                status = "caught" if failed else "MISSED"
            seconds = time.monotonic() - tick
            detail = f"{len(failed)} failed, e.g. {failed[0]}" if status == "caught" else (line if status != "MISSED" else m.why)
            rows.append((m, status, detail, seconds))
            print(f"{m.name:28s} {status:8s} {seconds:6.1f}s  {detail}", flush=True)
    caught = sum(status == "caught" for _, status, _, _ in rows)
    print("\n| mutant | planted bug | tests run | result |\n|---|---|---|---|")
    for m, status, _, _ in rows:
        print(f"| {m.name} | {m.why} | {', '.join(Path(t).name for t in m.tests)} | {status} |")
    print(f"\n{caught} of {len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
