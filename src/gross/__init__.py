"""GroSS: group-size series decomposition of convolutional networks.

Decompose each convolution of a trained network into a series of grouped-conv bottlenecks
(one per group size), train every group-size configuration at once, search the space under a
cost budget and export the chosen network as plain PyTorch layers.
"""

from . import models, search
from .btd import BTD, btd, btd_to_weight
from .expand import expand
from .export import export, export_onnx, load, save
from .latency import LatencyTable, latency_table
from .macs import MACs, MACsTable, count_macs, macs_table
from .model import (
    decompose,
    get_config,
    gross_layers,
    layer_specs,
    restore_layers,
    sample_config,
    search_space,
    set_config,
)
from .sampling import group_size_probs
from .search import SearchResult, evaluate_configs
from .series import GroSSConv2d, default_group_sizes

__version__ = "0.1.0"

__all__ = [
    "BTD",
    "btd",
    "btd_to_weight",
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
]
