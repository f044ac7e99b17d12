"""Latency tables: structure, costs, JSON and runtimes (timings are noisy, so never their values)."""

import copy
import json
import platform
import resource
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gross
from gross.latency import (
    DENSE,
    LatencyTable,
    compare_latency,
    describe_setup,
    latency_setup,
    latency_table,
    measure_latency,
    normalize_choice,
    steady_allocator,
)
from gross.models import PaperNet
from gross.runtime import RuntimeMissing, check_runtime, forward_fn

FAST = dict(warmup=1, repeats=2, block_ms=0.05)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return gross.decompose(PaperNet(widths=(8, 8, 16, 16)), skip=["conv1"], max_iter=2).eval()


def hand_table() -> LatencyTable:
    return LatencyTable(
        layers=("a", "b"),
        options=({1: 3.0, 2: 2.0, DENSE: 2.5}, {1: 1.0, 4: 0.5, DENSE: 0.75}),
        rest=10.0,
        input_shapes=((1, 2, 8, 8), (1, 4, 4, 4)),
        meta={"device": "cpu"},
    )


def test_normalize_choice():
    assert normalize_choice(4) == 4
    assert normalize_choice(torch.tensor(4)) == 4
    assert normalize_choice(0) == DENSE
    assert normalize_choice("Dense") == DENSE
    for bad in (-1, 1.5, "big", None):
        with pytest.raises(ValueError):
            normalize_choice(bad)


def test_cost_sums_layers_and_rest():
    table = hand_table()
    assert table.cost((1, 4)) == 10.0 + 3.0 + 0.5
    assert table((2, DENSE)) == table((2, 0)) == 10.0 + 2.0 + 0.75
    assert table.cost({"b": 1, "a": 1}) == 14.0
    assert table.per_layer((2, 1)) == {"a": 2.0, "b": 1.0}
    assert table.choices() == ((1, 2, DENSE), (1, 4, DENSE))


def test_cost_rejects_bad_configs():
    table = hand_table()
    for bad in ((1,), (1, 4, 4), (3, 4), {"a": 1}, {"a": 1, "b": 1, "c": 1}, ("huge", 1)):
        with pytest.raises(ValueError):
            table.cost(bad)


def test_fused_faster_names_layers_whose_dense_conv_is_faster():
    table = hand_table()
    assert table.fused_faster((1, 1)) == {"a", "b"}
    assert table.fused_faster((2, 1)) == {"b"}
    assert table.fused_faster((2, 4)) == set()
    assert table.fused_faster((DENSE, 4)) == set()


def test_json_round_trip(tmp_path):
    table = hand_table()
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["layers"][0]["ms"] == {"1": 3.0, "2": 2.0, "dense": 2.5}


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"format": "other"}), json.dumps({"format": "gross-latency-table", "version": 1})],
)
def test_load_rejects_malformed(tmp_path, text):
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(ValueError):
        LatencyTable.load(tmp_path / "t.json")


def test_table_rejects_negative_times():
    with pytest.raises(ValueError):
        LatencyTable(layers=("a",), options=({1: -1.0},), rest=0.0, input_shapes=((1, 1, 1, 1),))


def test_latency_table_structure(small_net, tmp_path):
    config = gross.get_config(small_net)
    table = latency_table(small_net, (3, 32, 32), batch_size=3, **FAST)
    names = [n for n, _ in gross.gross_layers(small_net)]
    assert list(table.layers) == names == ["conv2", "conv3", "conv4"]
    for (_, layer), options in zip(gross.gross_layers(small_net), table.options):
        assert set(options) == set(layer.group_sizes) | {DENSE}
    assert table.input_shapes == ((3, 8, 16, 16), (3, 8, 8, 8), (3, 16, 4, 4))
    # The rest: the network with every layer dense, timed whole, less those layers' entries.
    assert table.meta["anchor"]["config"] == ["dense"] * 3  # the rest: see test_the_rest_is_what_the_network_runs_beyond_its_gross_layers
    assert table.meta["batch_size"] == 3 and table.meta["device"] == "cpu"
    assert table.meta["threads"] == torch.get_num_threads() and table.meta["torch"] == torch.__version__
    assert table.meta["allocator"] == steady_allocator()
    assert table.cost(config) == pytest.approx(table.rest + sum(o[s] for o, s in zip(table.options, config)))
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    # Timing works on a copy: the model keeps its GroSS layers and configuration.
    assert gross.get_config(small_net) == config and len(gross.gross_layers(small_net)) == 3


def test_latency_table_without_dense(small_net):
    table = latency_table(small_net, (3, 32, 32), include_dense=False, **FAST)
    assert not table.has_dense and all(DENSE not in o for o in table.options)
    largest = tuple(max(o) for o in table.options)  # the anchor without dense timings
    assert table.meta["anchor"]["config"] == [str(g) for g in largest]
    with pytest.raises(ValueError):
        table.cost((1, 1, DENSE))
    with pytest.raises(ValueError):
        table.fused_faster((1, 1, 1))


def test_latency_table_needs_gross_layers_and_sample_shape(small_net):
    with pytest.raises(ValueError):
        latency_table(PaperNet(), (3, 32, 32), **FAST)
    with pytest.raises(ValueError):
        latency_table(small_net, (1, 3, 32, 32), **FAST)


def test_dense_conv_equals_bottleneck():
    torch.manual_seed(0)
    layer = gross.GroSSConv2d(6, 4, 3, stride=2, padding=1, group_sizes=(1, 2, 6), dtype=torch.float64)
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    for s in layer.group_sizes:
        torch.testing.assert_close(layer.dense_conv(s)(x), layer.bottleneck(s)(x), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_allocator_reuses_freed_activations():
    assert steady_allocator() == "glibc malloc: mmap threshold 32 MiB, trim threshold 64 MiB"
    x = torch.randn(64, 32, 32, 32)  # 8 MiB, as one activation of the paper network at batch 64
    for _ in range(3):
        x * 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x * 2  # a fresh 8 MiB result, freed at once
    # Handed back to the kernel at every free, each would fault its 2048 pages in again (without
    # the setting: 10241 faults here, glibc's own tuning; 20490 with a fixed 128 KiB threshold).
    # Reused, none does, but some may come from fresh heap when other tests ran before (seen:
    # 2048 faults after the latency table tests, 6904 once in a full run under load), so the bound
    # is half of the 10 results' pages that handing them back would fault.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 5 * 2048


def flop_clock(fns, **_):
    """A stand-in for the timer that does not depend on the machine: one call's FLOPs."""
    out = {}
    for key, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        out[key] = float(counter.get_total_flops())
    return out


def module_flops(model, shape, config=None):
    """FLOPs of each named module of one forward pass, as FlopCounterMode attributes them."""
    if config is not None:
        gross.set_config(model, config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(shape))
    top = type(model).__name__
    return {k.removeprefix(top + "."): sum(v.values()) for k, v in counter.get_flop_counts().items()}


@pytest.mark.parametrize("include_dense", [True, False])
def test_the_rest_is_what_the_network_runs_beyond_its_gross_layers(small_net, monkeypatch, include_dense):
    # With an additive clock (FLOPs) each entry is its layer's cost inside the network at that
    # choice, and the rest the cost of every other module, measured in the network itself.
    monkeypatch.setattr(gross.latency, "_bench", flop_clock)
    net = copy.deepcopy(small_net)
    table = latency_table(net, (3, 32, 32), batch_size=3, include_dense=include_dense, **FAST)
    shape = (3, 3, 32, 32)
    names = [n for n, _ in gross.gross_layers(net)]
    space = gross.search_space(net)
    for i, (name, sizes) in enumerate(zip(names, space)):
        for s in sizes:
            config = tuple(s if j == i else other[0] for j, other in enumerate(space))
            assert table.options[i][s] == module_flops(net, shape, config)[name], (name, s)
    if include_dense:
        dense = module_flops(gross.export(net, (DENSE,) * len(names)), shape)
        assert [o[DENSE] for o in table.options] == [dense[n] for n in names]
    flops = module_flops(net, shape, tuple(s[0] for s in space))
    assert table.rest == flops["Global"] - sum(flops[n] for n in names) == sum(flops[n] for n in ("conv1", "fc1", "fc2"))


def test_compare_and_measure_latency_time_each_network_at_the_batch_size(monkeypatch):
    monkeypatch.setattr(gross.latency, "_bench", flop_clock)
    nets = {"a": nn.Conv2d(3, 4, 3), "b": nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())}
    # 2 FLOPs per multiply-add: out pixels x C_out x C_in x kernel.
    assert compare_latency(nets, (3, 8, 8), batch_size=2, **FAST) == {"a": 2 * 2 * 36 * 4 * 27, "b": 2 * 2 * 64 * 4 * 3}
    assert measure_latency(nets["a"], (3, 8, 8), **FAST) == 2 * 36 * 4 * 27


# ---------------------------------------------------------------------------------------------
# Runtimes: where the table was measured, and onnxruntime


def tiny_net() -> nn.Module:
    """One GroSS layer with two group sizes inside a small network: few ONNX graphs to export."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    return gross.decompose(net, group_sizes=(1, 4), skip=["0"], max_iter=2).eval()


def test_the_table_header_records_where_it_was_measured(small_net, tmp_path):
    threads = torch.get_num_threads()
    table = latency_table(small_net, (3, 32, 32), batch_size=3, threads=threads + 1, **FAST)
    assert torch.get_num_threads() == threads  # set for the timing only
    assert table.setup == {"runtime": "torch", "batch_size": 3, "threads": threads + 1, "device": "cpu"}
    assert table.meta["runtime_version"] == torch.__version__
    table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json")
    assert loaded == table and loaded.setup == table.setup
    same = latency_setup("torch", 3, threads + 1, "cpu")
    assert loaded.mismatch(same) is None
    for other in ({"batch_size": 64}, {"runtime": "onnxruntime"}, {"threads": threads + 2}, {"device": "cuda:0"}):
        why = loaded.mismatch({**same, **other})
        assert why == f"it was measured with {describe_setup(table.setup)}, not {describe_setup({**same, **other})}"
    assert describe_setup(latency_setup("onnxruntime", 64, 2)) == "onnxruntime, batch 64, 2 threads, cpu"


def test_a_table_from_before_runtimes_were_recorded_is_torch():
    table = hand_table()  # meta {"device": "cpu"} only, as version-1 tables measured by torch
    assert table.setup == {"runtime": "torch", "batch_size": None, "threads": None, "device": "cpu"}
    assert table.mismatch(latency_setup("torch", 1, 1)) is not None  # unknown batch size: never taken as a match


def test_onnxruntime_missing_is_one_clear_error(small_net, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(RuntimeMissing, match=r"needs onnxruntime, onnx, onnxscript and onnxruntime is not installed: pip install 'gross\[export\]'"):
        latency_table(small_net, (3, 32, 32), runtime="onnxruntime", **FAST)
    with pytest.raises(RuntimeMissing):
        measure_latency(nn.Conv2d(3, 4, 3), (3, 8, 8), runtime="onnxruntime", **FAST)
    assert latency_table(small_net, (3, 32, 32), **FAST).setup["runtime"] == "torch"  # torch needs nothing more


def test_runtime_is_checked():
    with pytest.raises(ValueError, match="unknown latency runtime 'tvm'"):
        check_runtime("tvm")
    with pytest.raises(ValueError, match="onnxruntime runtime times on the CPU"):
        check_runtime("onnxruntime", "cuda")


def test_onnx_graphs_give_the_torch_outputs():
    pytest.importorskip("onnxruntime")
    net = tiny_net()
    layer = net[2]
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        for module in (layer.bottleneck(1), layer.bottleneck(4), layer.dense_conv(4)):
            (got,) = forward_fn(module.eval(), (x,), "onnxruntime", 1)()
            np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-5)
        # The anchor: the whole network with the GroSS layer dense.
        whole = gross.export(net, (DENSE,)).eval()
        x = torch.randn(2, 3, 4, 4)
        (got,) = forward_fn(whole, (x,), "onnxruntime", 1)()
        np.testing.assert_allclose(got, whole(x).numpy(), rtol=1e-4, atol=1e-5)


def test_latency_table_on_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net = tiny_net()
    table = latency_table(net, (3, 4, 4), batch_size=2, runtime="onnxruntime", threads=1, **FAST)
    # No sign asserted for the rest: one session call per layer can cost more than the layer's share
    # of the whole graph, so on onnxruntime it may well be negative (see gross.latency).
    assert table.layers == ("2",) and set(table.options[0]) == {1, 4, DENSE}
    assert table.setup == {"runtime": "onnxruntime", "batch_size": 2, "threads": 1, "device": "cpu"}
    assert table.meta["runtime_version"] == ort.__version__
    assert table.rest == pytest.approx(table.meta["anchor"]["ms"] - table.options[0][DENSE])
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json").setup == table.setup
    times = compare_latency({"a": gross.export(net, (1,)), "b": gross.export(net, (4,))}, (3, 4, 4), runtime="onnxruntime", **FAST)
    assert set(times) == {"a", "b"}
