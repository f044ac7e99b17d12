"""Export with fused layers and dense choices, save/load, ONNX, and the exported network's size."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gross
from gross.export import export, export_onnx, export_program, load, save
from gross.latency import DENSE, LatencyTable
from gross.models import PaperNet, resnet20

WIDTHS = (8, 8, 16, 16)
SHAPE = (3, 32, 32)


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random GroSS weights: every difference term non-zero, unlike a converged decomposition.

    Scaled by 1/sqrt(fan-in) so that activations stay O(1) through a deep network.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in gross.gross_layers(model):
            for p in layer.parameters():
                scale = 0.1 if p.dim() == 1 else p[0].numel() ** -0.5
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    original = PaperNet(widths=WIDTHS).eval()
    model = gross.decompose(PaperNet(widths=WIDTHS), skip=["conv1"], max_iter=2)
    model.load_state_dict(original.state_dict(), strict=False)  # same untouched layers as the original
    return original, perturbed(model)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = gross.decompose(resnet20(), group_sizes=(1, 4, 16), skip=["conv1"], max_iter=2)
    return perturbed(model, seed=1)


def is_plain(model: nn.Module) -> bool:
    return not any(isinstance(m, gross.GroSSConv2d) for m in model.modules()) and all(
        type(m).__module__.startswith(("torch.nn", "gross.models")) for m in model.modules()
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fused_export_equals_bottleneck(resnet, dtype, tol):
    model = resnet.to(dtype)
    try:
        # Small images: CPU grouped convs in float64 take a slow path.
        x = torch.randn(1, 3, 8, 8, dtype=dtype)
        config = gross.sample_config(model, 0.0, torch.Generator().manual_seed(3))
        plain = export(model, config)
        fused = export(model, config, fuse=True)
        names = [n for n, _ in gross.gross_layers(model)]
        assert all(type(fused.get_submodule(n)) is nn.Conv2d for n in names)
        assert all(m.groups == 1 for m in fused.modules() if isinstance(m, nn.Conv2d))
        torch.testing.assert_close(fused(x), plain(x), rtol=tol, atol=tol)
        some = export(model, config, fuse={names[0], names[5]})
        assert type(some.get_submodule(names[0])) is nn.Conv2d
        assert isinstance(some.get_submodule(names[1]), nn.Sequential)
        assert some.gross_export[names[0]] == {"choice": config[0], "fused": True}
        torch.testing.assert_close(some(x), plain(x), rtol=tol, atol=tol)
    finally:
        resnet.float()


def test_fuse_auto_follows_the_latency_table(paper):
    _, model = paper
    table = LatencyTable(
        layers=("conv2", "conv3", "conv4"),
        options=tuple({s: 1.0 for s in m.group_sizes} | {DENSE: d} for (_, m), d in zip(gross.gross_layers(model), (0.5, 2.0, 0.5))),
        rest=1.0,
        input_shapes=((1, 8, 16, 16), (1, 8, 8, 8), (1, 16, 4, 4)),
    )
    exported = export(model, (1, 2, DENSE), fuse="auto", latency=table)
    assert exported.gross_export == {
        "conv2": {"choice": 1, "fused": True},
        "conv3": {"choice": 2, "fused": False},
        "conv4": {"choice": DENSE, "fused": False},
    }
    with pytest.raises(ValueError):
        export(model, fuse="auto")
    with pytest.raises(ValueError):
        export(model, fuse={"conv1"})
    with pytest.raises(ValueError):
        export(model, (1, 3, 4))


def test_dense_choice_copies_the_original_conv(paper):
    original, model = paper
    x = torch.randn(2, *SHAPE)
    exported = export(model, {"conv3": DENSE, "conv4": 0}, original=original)
    assert gross.get_config(model) == tuple(m.group_sizes[-1] for _, m in gross.gross_layers(model))
    assert torch.equal(exported.conv3.weight, original.conv3.weight)
    torch.testing.assert_close(exported.conv4(torch.ones(1, 16, 4, 4)), original.conv4(torch.ones(1, 16, 4, 4)))
    # Without the original, "dense" is the fused bottleneck at the largest group size.
    fallback = export(model, (DENSE, 8, 16))
    full = export(model, (8, 8, 16))
    torch.testing.assert_close(fallback(x), full(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture,arch", [("paper", {"name": "paper", "kwargs": {"widths": WIDTHS}}), ("resnet", "resnet20")])
def test_save_load_round_trip(request, tmp_path, fixture, arch):
    model = request.getfixturevalue(fixture)
    model = model[1] if fixture == "paper" else model
    x = torch.randn(2, *SHAPE)
    config = gross.sample_config(model, 0.0, torch.Generator().manual_seed(5))
    names = [n for n, _ in gross.gross_layers(model)]
    exported = export(model, config, fuse={names[-1]})
    save(exported, tmp_path, arch=arch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors"]
    loaded = load(tmp_path)
    assert is_plain(loaded) and not loaded.training
    torch.testing.assert_close(loaded(x), exported(x), rtol=0, atol=0)
    assert loaded.state_dict().keys() == exported.state_dict().keys()
    header = json.loads((tmp_path / "net.json").read_text())
    assert header["config"] == list(config)
    assert header["parameters"] == sum(p.numel() for p in exported.parameters())
    # A loaded network saves again without being told its architecture.
    save(loaded, tmp_path / "again")
    torch.testing.assert_close(load(tmp_path / "again")(x), exported(x), rtol=0, atol=0)


def test_save_exports_a_gross_model(paper, tmp_path):
    _, model = paper
    x = torch.randn(2, *SHAPE)
    save(model, tmp_path, arch={"name": "paper", "kwargs": {"widths": WIDTHS}}, config=(2, 4, 8))
    torch.testing.assert_close(load(tmp_path)(x), export(model, (2, 4, 8))(x), rtol=0, atol=0)


def test_save_needs_a_matching_architecture(paper, tmp_path):
    _, model = paper
    exported = export(model)
    with pytest.raises(ValueError):
        save(exported, tmp_path, arch="paper")  # default widths: another state dict
    with pytest.raises(ValueError):
        save(exported, tmp_path, arch="resnet20")
    with pytest.raises(ValueError):
        save(exported, tmp_path, arch={"name": "paper", "kwargs": {"widths": WIDTHS}}, config=(1, 1, 1))
    with pytest.raises(ValueError):
        save(PaperNet(), tmp_path, arch="paper")
    assert not (tmp_path / "net.json").exists()


def test_a_network_given_in_python_loads_into_a_fresh_one(paper, tmp_path):
    # No name rebuilds it: net.json records its class, and load takes a freshly built one.
    original, model = paper
    x = torch.randn(2, *SHAPE)
    config = (2, 4, 16)
    save(model, tmp_path, config=config, original=original)
    header = json.loads((tmp_path / "net.json").read_text())
    assert header["arch"] == {"name": "python:gross.models.PaperNet", "kwargs": {}, "source": "python"}
    with pytest.raises(ValueError, match=r"given in Python.*gross.load\(path, model=PaperNet\(...\)\)"):
        load(tmp_path)
    with pytest.raises(ValueError, match="was a gross.models.PaperNet, but model= is a gross.models.CifarResNet"):
        load(tmp_path, model=resnet20())
    loaded = load(tmp_path, model=PaperNet(widths=WIDTHS))
    gross.set_config(model, config)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(loaded(x), export(model, config)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit the base architecture"):  # checked against `original` before writing
        save(model, tmp_path / "other", config=config, original=PaperNet())


def test_an_import_reference_is_rebuilt_by_name(paper, tmp_path):
    _, model = paper
    x = torch.randn(2, *SHAPE)
    save(model, tmp_path, arch={"name": "gross.models:PaperNet", "kwargs": {"widths": WIDTHS}}, config=(1, 2, 4))
    assert json.loads((tmp_path / "net.json").read_text())["arch"]["source"] == "import"
    torch.testing.assert_close(load(tmp_path)(x), export(model, (1, 2, 4))(x), rtol=0, atol=0)
    header = json.loads((tmp_path / "net.json").read_text())
    header["arch"]["name"] = "no_such_package.nets:PaperNet"
    (tmp_path / "net.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="cannot rebuild the architecture 'no_such_package.nets:PaperNet'.*pass model="):
        load(tmp_path)
    torch.testing.assert_close(load(tmp_path, model=PaperNet(widths=WIDTHS))(x), export(model, (1, 2, 4))(x), rtol=0, atol=0)


USER_NET = Path(__file__).resolve().parent / "user_model" / "mynet.py"  # BatchNorm, a residual block, stride, dilation

# Run in a fresh interpreter that cannot import the user's file (isolated: no script folder or
# PYTHONPATH on sys.path): torch alone runs the program, and neither gross nor mynet gets imported.
RUN_PROGRAM = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()
torch.save(program(torch.load(sys.argv[2])), sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] in ("gross", "mynet", "blocks")], "imported gross or the user's code"
"""


def test_a_network_from_a_user_file_reloads_through_gross_load_and_torch_export(tmp_path):
    reference = f"{USER_NET}:MyNet"
    torch.manual_seed(0)
    model = perturbed(gross.decompose(gross.models.build_model(reference, width=8).eval(), max_iter=2))
    config = gross.sample_config(model, 0.0, torch.Generator().manual_seed(1))
    save(model, tmp_path, arch={"name": reference, "kwargs": {"width": 8}}, config=config)
    assert json.loads((tmp_path / "net.json").read_text())["arch"] == {"name": reference, "kwargs": {"width": 8}, "source": "import"}
    x = torch.randn(3, 3, 12, 10)  # not square, and another batch size than traced
    gross.set_config(model, config)
    reference_out = model(x)
    loaded = load(tmp_path)
    torch.testing.assert_close(loaded(x), reference_out)
    export_program(loaded, tmp_path / "net.pt2", (3, 12, 10))
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-I", "-c", RUN_PROGRAM, "net.pt2", "x.pt", "y.pt"], cwd=tmp_path, check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), reference_out)


class DataDependent(nn.Module):
    """A branch on the values of its input: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_a_network_torch_export_cannot_trace_is_one_note(tmp_path):
    from gross.pipeline import _program_check

    x = torch.randn(2, *SHAPE)
    info = _program_check(DataDependent(), tmp_path / "net.pt2", x)
    assert not info["written"] and not (tmp_path / "net.pt2").exists()
    assert info["note"].startswith("net.pt2 skipped: torch.export could not trace the network (") and "\n" not in info["note"]
    info = _program_check(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), tmp_path / "net.pt2", x)
    assert info["checked"] and info["max_abs_diff"] <= 1e-6


def corrupt_cases():
    def layer(h, **kw):
        h["layers"][0]["convs"][1].update(kw)

    return {
        "not json": lambda h: "{oops",
        "format": lambda h: h.update(format="something"),
        "version": lambda h: h.update(version=99),
        "arch name": lambda h: h.update(arch={"name": "alexnet", "kwargs": {}}),
        "arch kwargs": lambda h: h.update(arch={"name": "paper", "kwargs": {"depth": 3}}),
        "layer name": lambda h: h["layers"][0].update(name="conv9"),
        "not a conv": lambda h: h["layers"][0].update(name="fc1"),
        "padding": lambda h: layer(h, padding=[0, 0]),
        "stride": lambda h: layer(h, stride=[2, 2]),
        "groups": lambda h: layer(h, groups=1),
        "channels": lambda h: h["layers"][0]["convs"][0].update(out_channels=4),
        "missing key": lambda h: h["layers"][0]["convs"][0].pop("groups"),
        "dtype": lambda h: h.update(dtype="int8"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_load_rejects_a_corrupted_header(paper, tmp_path, case):
    _, model = paper
    save(model, tmp_path, arch={"name": "paper", "kwargs": {"widths": WIDTHS}}, config=(2, 4, 8))
    header = json.loads((tmp_path / "net.json").read_text())
    changed = corrupt_cases()[case](header)
    (tmp_path / "net.json").write_text(changed if isinstance(changed, str) else json.dumps(header))
    with pytest.raises(ValueError):
        load(tmp_path)


def test_load_rejects_corrupted_weights(paper, tmp_path):
    _, model = paper
    save(model, tmp_path, arch={"name": "paper", "kwargs": {"widths": WIDTHS}})
    data = (tmp_path / "net.safetensors").read_bytes()
    (tmp_path / "net.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load(tmp_path)
    (tmp_path / "net.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError):
        load(tmp_path)


def analytic(model: nn.Module, original: nn.Module, config, fused: set, hw: dict) -> tuple[int, int]:
    """(params, MACs per image) of the export, from the layer shapes alone."""
    params = sum(p.numel() for n, p in original.named_parameters() if n.split(".")[0] not in hw)
    macs = 0
    for n, m in original.named_modules():
        if isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d) and n not in hw:
            macs += 32 * 32 * m.out_channels * m.in_channels * 9  # conv1 at full resolution
    for (name, layer), s in zip(gross.gross_layers(model), config):
        c_in, c_out, d, k = layer.in_channels, layer.out_channels, layer.width, math.prod(layer.kernel_size)
        pixels = hw[name] ** 2  # stride 1, same padding: input and output resolution agree
        if s == DENSE or name in fused:
            params += c_out * c_in * k + c_out
            macs += pixels * c_out * c_in * k
        else:
            params += d * c_in + d * s * k + c_out * d + c_out
            macs += pixels * (d * c_in + d * s * k + c_out * d)
    return params, macs


def test_exported_size_matches_the_analytic_count(paper):
    original, model = paper
    hw = {"conv2": 16, "conv3": 8, "conv4": 4}
    for config, fused in [((1, 2, 4), set()), ((8, 1, 16), {"conv3"}), ((4, DENSE, 1), {"conv2"})]:
        exported = export(model, config, fuse=fused, original=original)
        params, macs = analytic(model, original, config, fused, hw)
        assert sum(p.numel() for p in exported.parameters()) == params
        assert gross.count_macs(exported, SHAPE).total == macs
        if not fused and DENSE not in config:
            assert gross.macs_table(model, SHAPE).cost(config) == macs


def test_onnx_matches_torch(paper, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    original, model = paper
    exported = export(model, (2, DENSE, 4), fuse={"conv4"}, original=original)
    path = export_onnx(exported, tmp_path / "net.onnx", SHAPE)
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *SHAPE)  # another batch size than the traced one
    (y,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(y, exported(x).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        export_onnx(model, tmp_path / "gross.onnx", SHAPE)
