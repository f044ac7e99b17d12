"""Configuration: one dataclass per stage, YAML in, resolved YAML out.

Every field has a default and a comment. The defaults are the quick run on the embedded digits
dataset (``gross run`` with no arguments) with the optimiser
recipe of the authors' released code, which trains; ``experiments/paper-cifar10.yaml`` holds the
paper's full CIFAR-10 schedule.

A configuration is resolved in this order, each step overriding the previous one:

1. the dataclass defaults below;
2. the recipe, when one is named: ``recipe: authors`` is the released code's CIFAR recipe (batch
   256, lr 0.1, weight decay 1e-3, pad 4, flips, std 0.5, FC init std 0.01), ``recipe: paper`` the
   paper's literal text (batch 128, lr 0.1, no weight decay, pad 2, flips, std 0.225, FC init std
   0.1);
3. a YAML file (``--config-file``), or the run folder's ``config.yaml``;
4. ``KEY=VALUE`` overrides (``--set train.epochs=3``; values are parsed as YAML, so
   ``--set decompose.skip=[conv1]`` or ``--set decompose.group_sizes=null`` work).

Unknown keys and values of the wrong type are errors (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .runtime import RUNTIMES
from .sampling import DEFAULT_FORM, FORMS

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "DecomposeConfig",
    "ReconstructConfig",
    "FinetuneConfig",
    "FixedConfig",
    "EvaluateConfig",
    "SearchConfig",
    "LatencyConfig",
    "ExportConfig",
    "Config",
    "RECIPES",
    "resolve_config",
    "load_config",
    "config_to_dict",
    "dump_config",
    "parse_override",
    "milestone_epochs",
]


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type or an unreadable file; the message says which."""


@dataclass
class DataConfig:
    dataset: str = "digits"  # "digits" (embedded, 1,797 8x8 digits upsampled to 32x32x3), "cifar10" (looked for in root), or a path to a .npz file, to a folder of train.npz + test.npz or cifar-10-batches-py, or to an image folder train/<class>/<image> (+ optional val/, test/; docs/data.md)
    root: str = "data"  # where "cifar10" is looked for
    download: bool = False  # "cifar10" missing from root: download it there from the official address and check its MD5
    val_size: int | float = 0.2  # validation split cut from train: a fraction (< 1) or a number of images (>= 1; CIFAR-10: 10000)
    split_seed: int = 0  # seed of the stratified validation split
    pad: int = 4  # augmentation: zero padding before the random crop back to the input size (authors' code 4, paper text 2; 0: no crop)
    flip: bool = False  # augmentation: horizontal flip with p = 0.5 (off for digits, which are not mirror-symmetric; on in both CIFAR recipes)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel normalisation mean, pixels in [0, 1]
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel normalisation std (authors' code 0.5, paper text 0.225)
    eval_batch_size: int = 1000  # batch size of every evaluation
    limit: int = 0  # keep only the first N training images (0: all); for smoke tests
    image_size: int | list[int] | None = None  # network input size, an int or [height, width]; null: the images' own size (an image folder's images must then share one); image folders are resized to it (docs/data.md)
    channels: int = 3  # image folders: 3 (RGB) or 1 (grayscale); other modes are converted
    augment: str = "auto"  # training augmentation: pad_crop (pad, random crop, flip), random_resized_crop (scale 0.08-1, ratio 3/4-4/3, flip: ImageNet), none, or auto (random_resized_crop from 128 px, else pad_crop); flips only with data.flip
    memory_gb: float | None = None  # image folders whose decoded images fit in this many GiB are held in memory (decoded once, cached), larger ones streamed; null: a quarter of the machine's memory; 0: always stream
    cache: str | None = ""  # where decoded in-memory image folders are cached: "" the run folder's data-cache/, a path (shared by runs), or null (decode every time)
    workers: int | None = None  # image folders: decoding processes per training process; null: the CPUs available, at most 8
    skip_bad: bool = False  # image folders: skip unreadable images (counted in the log) instead of stopping at the first


@dataclass
class ModelConfig:
    name: str = "paper"  # a built-in network (paper, resnet20, resnet18, vgg16_bn), package.module:callable, or path/to/file.py:callable (relative to the current folder)
    kwargs: dict = field(default_factory=dict)  # constructor arguments, e.g. {widths: [32, 32, 64, 64], fc_std: 0.01}; num_classes, in_channels and image_size come from the data where the constructor takes them and they are not given
    weights: str | None = None  # trained weights to start from (.safetensors, or .pt/.pth/.bin read with weights_only=True; nested under state_dict/model/model_state_dict and a module. prefix accepted): the base stage adopts them instead of training


@dataclass
class OptimConfig:
    """Fields shared by every training stage: SGD with momentum and a step schedule."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 256  # images per step, over all processes together
    lr: float = 0.1  # initial learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-3  # L2 penalty on the trained weights (authors' code: 1e-3 in every stage)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # lr x gamma after these epochs; values < 1 are fractions of epochs (0.5 of 100 = after epoch 50)
    gamma: float = 0.1  # learning-rate factor at each milestone
    seed: int = 0  # seed of initialisation (base), shuffling, augmentation, dropout and group-size sampling
    eval_every: int = 1  # validate every N epochs (the last epoch always)
    checkpoint_every: int = 1  # write a resumable checkpoint every N epochs


@dataclass
class TrainConfig(OptimConfig):
    """Base training of the original network (cross-entropy, every parameter)."""

    epochs: int = 15  # the paper: 100
    batch_size: int = 64  # the recipes: 256 (authors' code), 128 (paper text); 64 gives the small digits set enough steps
    lr: float = 0.05  # the recipes: 0.1


@dataclass
class DecomposeConfig:
    skip: list[str] = field(default_factory=list)  # module names, or shell-style patterns (layer1.*.conv2), left alone
    only: list[str] = field(default_factory=list)  # if given, only convs whose names match one of these shell-style patterns are decomposed
    group_sizes: list[int] | None = None  # candidate group sizes of every layer (those dividing its width are kept); null: every power of two and the width (gross.default_group_sizes)
    nested: bool = False  # fit each group size warm-started from the previous one (smaller difference terms); false: independently, as the paper (the default until a full experiment compares the trained spaces)
    btd: dict = field(default_factory=lambda: {"max_iter": 200})  # options of gross.btd (tol, rtol, max_iter, seed); rtol's default depends on the layer's size; the paper: tol 1e-6, rtol 0
    device: str | None = None  # where the fits run: cpu, cuda, cuda:N or auto; null: the run's device
    workers: int = 1  # processes fitting at once on a CPU, sharing the run's threads (gross.decompose); 1: one fit at a time; 2 on 2 cores: ResNet-18 in 364 s, not 479


@dataclass
class ReconstructConfig(OptimConfig):
    """Response reconstruction: each decomposed layer reproduces the original layer's output."""

    epochs: int = 6  # the paper: 30
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # the paper: 1e-4 (GroSS), 0.01 (fixed configurations); a larger step size diverges on the series
    milestones: list[float] = field(default_factory=lambda: [0.67])  # the paper: after epoch 20 of 30
    alpha: float = 4.0  # group-size sampling temperature (0: uniform; larger: small sizes more often)
    sampling: str = DEFAULT_FORM  # p(s_i) ~ exp(-alpha i / N) ("normalised") or exp(-alpha i) ("literal", the paper's formula as written); see gross.sampling
    bn_eval: bool = True  # BatchNorm and dropout in eval mode (fixed statistics, deterministic targets)


@dataclass
class FinetuneConfig(OptimConfig):
    """Finetuning on the task with sampled group sizes; only the GroSS weights train."""

    epochs: int = 15  # the paper: 150
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # the paper: 1e-4 (GroSS), 1e-3 (fixed configurations)
    milestones: list[float] = field(default_factory=lambda: [0.53, 0.8])  # the paper: after epochs 80 and 120 of 150
    alpha: float = 4.0  # group-size sampling temperature; the paper: 4
    sampling: str = DEFAULT_FORM  # "normalised" (exp(-alpha i / N)) or "literal" (exp(-alpha i)); see gross.sampling
    bn_eval: bool = False  # BatchNorm in eval mode (running statistics frozen)
    distill: float = 0.0  # weight of distillation from the original network: loss = (1 - w) cross-entropy + w T^2 KL(teacher || student) at temperature T; 0: cross-entropy alone (the paper)
    temperature: float = 4.0  # distillation temperature T (softens both networks' outputs)
    sandwich: bool = False  # every step also trains the largest and the smallest configuration beside the sampled one (slimmable networks, BigNAS), gradients averaged; about 3x the time of a step


def _fixed_reconstruct() -> ReconstructConfig:
    return ReconstructConfig(lr=0.01)


def _fixed_finetune() -> FinetuneConfig:
    return FinetuneConfig(lr=1e-3)


@dataclass
class FixedConfig:
    """Training one configuration on its own: decompose at one size per layer, reconstruct, finetune."""

    configs: list[list[int]] = field(default_factory=list)  # configurations (one group size per decomposed layer, in module order) that `gross fixed` trains when none is given on the command line
    reconstruct: ReconstructConfig = field(default_factory=_fixed_reconstruct)  # lr 0.01 as the paper
    finetune: FinetuneConfig = field(default_factory=_fixed_finetune)  # lr 1e-3 as the paper (100 epochs, x0.1 after epoch 80)


@dataclass
class EvaluateConfig:
    """Scoring chosen configurations of a trained model (gross evaluate)."""

    split: str = "val"  # val or test; select configurations on val only
    uniform: bool = True  # every configuration with one group size in every layer
    samples: int = 16  # random configurations drawn uniformly from the space
    seed: int = 0  # seed of the random configurations
    recalibrate: int = 0  # re-estimate BatchNorm statistics for every configuration on this many training images (seeded, augmented as in training; 0: the trained statistics)


SEARCH_STRATEGIES = ("auto", "exhaustive", "beam", "evolution")


@dataclass
class SearchConfig:
    """Searching the trained GroSS space for the best configuration within a budget (gross search)."""

    strategy: str = "auto"  # exhaustive, beam, evolution, or auto: exhaustive when at most max_configs configurations fit the budget, else beam
    budget: str | float | None = "uniform:16"  # largest cost allowed: "uniform:G" (the cost of every layer at group size G), "P%" (of the original network's cost, e.g. 50%), a number (MACs; ms with cost: latency), or null (no limit)
    cost: str = "macs"  # macs, or latency: the predicted ms of the latency table (gross latency)
    latency_table: str = "latency/table.json"  # the table that cost: latency uses (a relative path is inside the run folder)
    max_configs: int = 5000  # most configurations the exhaustive search scores (auto: beam above that)
    beam_width: int = 4  # beam: configurations kept after each layer
    population: int = 16  # evolution: configurations per generation
    max_evaluations: int = 100  # evolution: configurations scored in all
    seed: int = 0  # evolution: seed of the random draws
    test: bool = False  # also measure every configuration's test accuracy (reported only; the search chooses on val)
    recalibrate: int = 0  # re-estimate BatchNorm statistics for every configuration on this many training images before scoring it (seeded, augmented as in training; 0: the trained statistics, shared by all configurations)


@dataclass
class LatencyConfig:
    """Measured latency where the network will run: the table of gross latency and export's comparison.

    Timed with the run's ``threads`` (intra-op threads of either runtime) on its ``device``.
    """

    runtime: str = "torch"  # torch (eager) or onnxruntime (ONNX graphs in an InferenceSession on the CPU; needs gross[export])
    batch_size: int = 1  # images per timed forward pass
    repeats: int = 100  # timed samples per candidate (the median is kept); with 25, the former default, the table's error
    # net of machine drift was 2.3-6.3% against 0.8-2.1% (benchmarks/results/library_defaults, benchmarks/results)


@dataclass
class ExportConfig:
    """The plain network at one configuration (gross export)."""

    config: list[int] | None = None  # group size per GroSS layer in module order (0: the original dense conv); null: the search's best (search/best.json)
    fuse: str = "none"  # none: every layer as its bottleneck (the MACs the search counted); auto: bottlenecks that the latency table (measured when missing) says are slower than one dense conv become that conv (same outputs); all
    onnx: bool = True  # also write net.onnx (needs the export extras onnx and onnxscript; checked against torch with onnxruntime when installed)
    opset: int = 18  # ONNX opset (17 or later)


@dataclass
class Config:
    name: str = "digits"  # run folder: RUNS/NAME
    runs: str = "runs"  # parent folder of run folders
    recipe: str | None = None  # null: the settings as given; authors: the released code's CIFAR recipe (trains); paper: the paper's literal text; see RECIPES
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (cuda when available)
    threads: int = 0  # torch CPU threads (0: torch's default); latency timing gives onnxruntime as many
    channels_last: bool = True  # channels-last memory format for images and conv weights (about 1.5x faster on CPU)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    fixed: FixedConfig = field(default_factory=FixedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs) / self.name


# The paper's text and the authors' code disagree (METHOD.md section 8); a recipe sets the fields
# where they do, over the defaults and under the YAML file and --set. The defaults already follow
# the code where the digits run allows (weight decay, pad 4, std 0.5, FC std 0.01, momentum and
# schedule) but use a smaller batch and no flips. Model keys apply to the paper network only.
RECIPES: dict[str, dict] = {
    "authors": {
        "data": {"pad": 4, "flip": True, "std": [0.5, 0.5, 0.5]},
        "train": {"batch_size": 256, "lr": 0.1, "weight_decay": 1e-3},
        "reconstruct": {"weight_decay": 1e-3},
        "finetune": {"weight_decay": 1e-3},
        "fixed": {"reconstruct": {"weight_decay": 1e-3}, "finetune": {"weight_decay": 1e-3}},
        "model": {"kwargs": {"fc_std": 0.01}},
    },
    "paper": {
        "data": {"pad": 2, "flip": True, "std": [0.225, 0.225, 0.225]},
        "train": {"batch_size": 128, "lr": 0.1, "weight_decay": 0.0},
        "reconstruct": {"weight_decay": 0.0},
        "finetune": {"weight_decay": 0.0},
        "fixed": {"reconstruct": {"weight_decay": 0.0}, "finetune": {"weight_decay": 0.0}},
        "model": {"kwargs": {"fc_std": 0.1}},
    },
}


def milestone_epochs(milestones: Sequence[float], epochs: int) -> list[int]:
    """Epoch numbers after which the learning rate drops: fractions (< 1) of ``epochs`` are rounded."""
    return sorted(int(round(m * epochs)) if m < 1 else int(m) for m in milestones)


# ---------------------------------------------------------------------------------------------
# Dict <-> dataclass


def config_to_dict(cfg: Any) -> Any:
    """A dataclass (recursively) as plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if errors else ConfigError(f"{key}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _from_dict(cls: type, values: Mapping, prefix: str = "") -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'configuration'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; {where} has: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, values[name] if values[name] is not None else {}, key + ".")
        else:
            kwargs[name] = _coerce(values[name], tp, key)
    return cls(**kwargs)


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err.__class__.__name__})") from None
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read configuration file {path}: {err.strerror or err}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix or delete it") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return values


def resolve_config(
    files: Sequence[str | Path | Mapping] = (), overrides: Sequence[str | Mapping] = ()
) -> Config:
    """Defaults, then the recipe, then YAML files (or dicts) in order, then ``KEY=VALUE`` overrides."""
    layers: list[Mapping] = [f if isinstance(f, Mapping) else _read_yaml(f) for f in files]
    layers += [parse_override(o) if isinstance(o, str) else o for o in overrides]
    user: dict = {}
    for layer in layers:
        if not isinstance(layer, Mapping):
            raise ConfigError(f"expected a mapping of sections, got {layer!r}")
        user = _merge(user, layer)
    recipe = user.get("recipe", Config.recipe)
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)} (or null)")
    values = config_to_dict(Config())
    if recipe is not None:
        values = _merge(values, RECIPES[recipe])
        user_model = user.get("model") or {}
        model_name = user_model.get("name", ModelConfig.name) if isinstance(user_model, Mapping) else None
        if model_name != "paper":
            values["model"] = config_to_dict(ModelConfig())
    values = _merge(values, user)
    cfg = _from_dict(Config, values)
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A configuration from one YAML file plus overrides."""
    return resolve_config([path], overrides)


# The options of gross.btd that decompose.btd may set (the series chooses init itself).
BTD_OPTIONS = {"tol": float, "rtol": float, "max_iter": int, "seed": int, "penalty": float, "width": int}


def _validate(cfg: Config) -> None:
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"name: {cfg.name!r} is not a folder name")
    if cfg.evaluate.split not in ("val", "test"):
        raise ConfigError(f"evaluate.split: expected val or test, got {cfg.evaluate.split!r}")
    for section in ("train", "reconstruct", "finetune"):
        _validate_optim(getattr(cfg, section), section)
    _validate_optim(cfg.fixed.reconstruct, "fixed.reconstruct")
    _validate_optim(cfg.fixed.finetune, "fixed.finetune")
    if cfg.data.val_size < 0 or (cfg.data.val_size >= 1 and cfg.data.val_size != int(cfg.data.val_size)):
        raise ConfigError(f"data.val_size: expected a fraction < 1 or a whole number of images, got {cfg.data.val_size}")
    if cfg.data.pad < 0 or cfg.data.eval_batch_size < 1 or cfg.data.limit < 0:
        raise ConfigError("data.pad and data.limit must be >= 0 and data.eval_batch_size >= 1")
    _validate_images(cfg.data)
    if cfg.threads < 0:
        raise ConfigError(f"threads: expected >= 0, got {cfg.threads}")
    if cfg.decompose.workers < 1:
        raise ConfigError(f"decompose.workers: expected >= 1, got {cfg.decompose.workers}")
    unknown = sorted(set(cfg.decompose.btd) - set(BTD_OPTIONS))
    if unknown:
        raise ConfigError(f"decompose.btd: unknown options {', '.join(unknown)}; known: {', '.join(BTD_OPTIONS)}")
    cfg.decompose.btd = {k: _coerce(v, BTD_OPTIONS[k], f"decompose.btd.{k}") for k, v in cfg.decompose.btd.items()}
    s = cfg.search
    if s.strategy not in SEARCH_STRATEGIES:
        raise ConfigError(f"search.strategy: expected one of {', '.join(SEARCH_STRATEGIES)}, got {s.strategy!r}")
    if s.cost not in ("macs", "latency"):
        raise ConfigError(f"search.cost: expected macs or latency, got {s.cost!r}")
    if min(s.max_configs, s.beam_width, s.max_evaluations) < 1 or s.population < 2:
        raise ConfigError("search.max_configs, beam_width and max_evaluations must be >= 1 and search.population >= 2")
    if cfg.latency.batch_size < 1 or cfg.latency.repeats < 1:
        raise ConfigError("latency.batch_size and latency.repeats must be >= 1")
    if cfg.latency.runtime not in RUNTIMES:
        raise ConfigError(f"latency.runtime: expected one of {', '.join(RUNTIMES)}, got {cfg.latency.runtime!r}")
    if cfg.export.fuse not in ("auto", "none", "all"):
        raise ConfigError(f"export.fuse: expected auto, none or all, got {cfg.export.fuse!r}")
    if cfg.export.opset < 17:
        raise ConfigError(f"export.opset: expected 17 or later, got {cfg.export.opset}")


def _validate_images(d: DataConfig) -> None:
    size = d.image_size
    if size is not None and (isinstance(size, int) and size < 1 or isinstance(size, list) and (len(size) != 2 or min(size) < 1)):
        raise ConfigError(f"data.image_size: expected a positive int or [height, width], got {size!r}")
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels: expected 3 (RGB) or 1 (grayscale), got {d.channels}")
    augments = ("auto", "pad_crop", "random_resized_crop", "none")
    if d.augment not in augments:
        raise ConfigError(f"data.augment: expected one of {', '.join(augments)}, got {d.augment!r}")
    if (d.memory_gb is not None and d.memory_gb < 0) or (d.workers is not None and d.workers < 0):
        raise ConfigError("data.memory_gb and data.workers must be >= 0")


def _validate_optim(opt: OptimConfig, key: str) -> None:
    if opt.epochs < 0:
        raise ConfigError(f"{key}.epochs: expected >= 0, got {opt.epochs}")
    if opt.batch_size < 1:
        raise ConfigError(f"{key}.batch_size: expected >= 1, got {opt.batch_size}")
    if opt.lr < 0 or opt.momentum < 0 or opt.weight_decay < 0:
        raise ConfigError(f"{key}: lr, momentum and weight_decay must be >= 0")
    if any(m <= 0 for m in opt.milestones):
        raise ConfigError(f"{key}.milestones: expected positive epochs or fractions, got {opt.milestones}")
    if opt.eval_every < 0 or opt.checkpoint_every < 0:
        raise ConfigError(f"{key}: eval_every and checkpoint_every must be >= 0")
    if not 0 <= getattr(opt, "distill", 0.0) <= 1 or getattr(opt, "temperature", 1.0) <= 0:
        raise ConfigError(f"{key}: distill must be in [0, 1] and temperature > 0")
    sampling = getattr(opt, "sampling", DEFAULT_FORM)
    if sampling not in FORMS:
        raise ConfigError(f"{key}.sampling: expected one of {', '.join(FORMS)}, got {sampling!r}")


def dump_config(cfg: Config) -> str:
    """The resolved configuration as YAML, sections in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
