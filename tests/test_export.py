import torch
from torch import nn

import gross
from gross.models import PaperNet, resnet20


def test_export_is_plain_and_equal_to_gross_model():
    torch.manual_seed(0)
    model = gross.decompose(resnet20(), group_sizes=(1, 4, 16), max_iter=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        config = gross.sample_config(model, 0.0, gen)
        exported = gross.export(model, config).eval()
        assert not any(isinstance(m, gross.GroSSConv2d) for m in exported.modules())
        assert all(type(m).__module__.startswith(("torch.nn", "gross.models")) for m in exported.modules())
        gross.set_config(model, config)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_holds_only_the_chosen_weights():
    torch.manual_seed(0)
    model = gross.decompose(PaperNet(), skip=["conv1"], max_iter=5)
    config = (2, 32, 64)
    exported = gross.export(model, config)
    gross_layer_params = sum(p.numel() for n, p in exported.named_parameters() if n.split(".")[0] in {"conv2", "conv3", "conv4"})
    expected = (32 * 32 + 32 * 2 * 9 + 32 * 32 + 32) + (32 * 32 + 32 * 32 * 9 + 64 * 32 + 64) + (64 * 64 + 64 * 64 * 9 + 64 * 64 + 64)
    assert gross_layer_params == expected
    assert isinstance(exported.conv2, nn.Sequential) and exported.conv2[1].groups == 16
    assert gross.get_config(model) == (32, 32, 64)
