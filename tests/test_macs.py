import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gross
from gross.models import PaperNet, resnet20


def flop_counter_macs(model, shape):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(shape))
    return counter.get_total_flops() // 2


def test_paper_network_counts_5081600():
    result = gross.count_macs(PaperNet(), (3, 32, 32))
    assert result.total == 5_081_600
    assert result.per_layer["conv2"] == 32 * 32 * 9 * 16 * 16
    assert flop_counter_macs(PaperNet().eval(), (1, 3, 32, 32)) == 5_081_600


@pytest.mark.parametrize("config", [(1, 1, 1), (2, 32, 64), (8, 16, 64), (32, 32, 64), (4, 4, 4)])
def test_macs_equal_flop_counter_on_exported_paper_net(config):
    torch.manual_seed(0)
    model = gross.decompose(PaperNet(), skip=["conv1"], max_iter=5)
    exported = gross.export(model, config).eval()
    expected = flop_counter_macs(exported, (2, 3, 32, 32))
    assert gross.count_macs(model, (2, 3, 32, 32), config).total == expected
    assert gross.count_macs(exported, (2, 3, 32, 32)).total == expected


def test_macs_equal_flop_counter_on_exported_resnet():
    torch.manual_seed(0)
    model = gross.decompose(resnet20(), group_sizes=(1, 4, 16), max_iter=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        config = gross.sample_config(model, 0.0, gen)
        exported = gross.export(model, config).eval()
        assert gross.count_macs(model, (3, 32, 32), config).total == flop_counter_macs(exported, (1, 3, 32, 32))


def test_table_cost_and_config_restored():
    torch.manual_seed(0)
    model = gross.decompose(PaperNet(widths=(8, 8, 16, 16)), max_iter=5)
    gross.set_config(model, (8, 8, 16))
    table = gross.macs_table(model, (3, 32, 32))
    assert table.layers == ("conv2", "conv3", "conv4")
    small = gross.count_macs(model, (3, 32, 32), (1, 1, 1))
    assert small.total == table.cost((1, 1, 1))
    assert gross.get_config(model) == (8, 8, 16)
    # Grouped conv MACs shrink linearly with the group size; the pointwise convs stay.
    conv4 = table.options[2]
    assert conv4[2] - conv4[1] == 16 * 1 * 9 * 4 * 4
    with pytest.raises(ValueError, match="invalid"):
        table.cost((1, 1, 3))
    with pytest.raises(ValueError, match="input_shape"):
        gross.count_macs(model, (32, 32))
