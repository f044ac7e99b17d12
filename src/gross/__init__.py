"""GroSS: group-size series decomposition of convolutional networks.

Decompose each convolution of a trained network into a series of grouped-conv bottlenecks
(one per group size), train every group-size configuration at once, search the space under a
cost budget and export the chosen network as plain PyTorch layers.
"""

import os

# OpenMP threads that spin while waiting made every op ~100x slower when another process held one
# of the cores (measured: 94 ms vs 0.6 ms per forward of the paper network). libgomp reads this
# when torch is first imported, so it only takes effect for programs (the CLI) that import gross
# before torch; an explicit setting is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The modules a user reaches through `gross.`: the pipeline's configuration, stages, loops and data.
from . import config, data, models, pipeline, search, train  # noqa: E402
from .btd import BTD, btd, btd_to_weight, conditioning  # noqa: E402
from .expand import expand  # noqa: E402
from .export import export, export_onnx, load, save  # noqa: E402
from .latency import LatencyTable, latency_table  # noqa: E402
from .macs import MACs, MACsTable, count_macs, macs_table  # noqa: E402
from .model import (  # noqa: E402
    batchnorm_state,
    decompose,
    get_config,
    gross_layers,
    layer_specs,
    load_batchnorm_state,
    recalibrate_batchnorm,
    restore_layers,
    sample_config,
    search_space,
    set_config,
)
from .sampling import group_size_probs  # noqa: E402
from .search import SearchResult, evaluate_configs  # noqa: E402
from .series import GroSSConv2d, default_group_sizes  # noqa: E402

__all__ = [
    "BTD",
    "btd",
    "btd_to_weight",
    "conditioning",
    "expand",
    "GroSSConv2d",
    "default_group_sizes",
    "decompose",
    "gross_layers",
    "get_config",
    "set_config",
    "search_space",
    "sample_config",
    "layer_specs",
    "restore_layers",
    "recalibrate_batchnorm",
    "batchnorm_state",
    "load_batchnorm_state",
    "group_size_probs",
    "MACs",
    "MACsTable",
    "count_macs",
    "macs_table",
    "export",
    "save",
    "load",
    "export_onnx",
    "LatencyTable",
    "latency_table",
    "SearchResult",
    "evaluate_configs",
    "search",  # the module: gross.search.search(model, data, strategy=..., budget=...)
    "models",
    "config",
    "data",
    "pipeline",
    "train",
]
