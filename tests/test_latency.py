"""Latency tables: structure, costs and JSON (timings are noisy, so never their values)."""

import json

import pytest
import torch
from torch import nn

import gross
from gross.latency import (
    DENSE,
    LatencyTable,
    compare_latency,
    latency_table,
    measure_latency,
    normalize_choice,
)
from gross.models import PaperNet

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
    for (name, layer), options in zip(gross.gross_layers(small_net), table.options):
        assert set(options) == set(layer.group_sizes) | {DENSE}
        assert all(v > 0 for v in options.values())
    assert table.input_shapes == ((3, 8, 16, 16), (3, 8, 8, 8), (3, 16, 4, 4))
    assert table.rest > 0
    assert table.meta["batch_size"] == 3 and table.meta["device"] == "cpu"
    assert table.meta["threads"] == torch.get_num_threads() and table.meta["torch"] == torch.__version__
    assert table.cost(config) == pytest.approx(table.rest + sum(o[s] for o, s in zip(table.options, config)))
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    # Timing works on a copy: the model keeps its GroSS layers and configuration.
    assert gross.get_config(small_net) == config and len(gross.gross_layers(small_net)) == 3


def test_latency_table_without_dense(small_net):
    table = latency_table(small_net, (3, 32, 32), include_dense=False, **FAST)
    assert not table.has_dense and all(DENSE not in o for o in table.options)
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


def test_measure_and_compare_latency():
    nets = {"a": nn.Conv2d(3, 4, 3), "b": nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())}
    times = compare_latency(nets, (3, 8, 8), batch_size=2, **FAST)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert measure_latency(nets["a"], (3, 8, 8), **FAST) > 0
