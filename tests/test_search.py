import csv
import itertools
import json
import logging
import math
import pickle
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gross
from gross import search as S
from gross.data import Dataset, batches
from gross.latency import LatencyTable
from gross.models import PaperNet, resnet20
from gross.series import GroSSConv2d

PAPER_SPACE = ((1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32, 64))


def random_gross(model, group_sizes=None, skip=()):
    """Replace convs by GroSS layers with random weights: tree vs. plain needs no decomposition."""
    gen = torch.Generator().manual_seed(0)
    for name, conv in list(model.named_modules()):
        if type(conv) is not nn.Conv2d or name in skip:
            continue
        sizes = [s for s in gross.default_group_sizes(conv.in_channels) if group_sizes is None or s in group_sizes]
        if len(sizes) < 2:
            continue
        layer = GroSSConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, bias=conv.bias is not None, group_sizes=sizes,
        )  # fmt: skip
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model.eval()


def small_paper_net():
    torch.manual_seed(0)
    return random_gross(PaperNet(widths=(8, 8, 16, 16)), skip=["conv1"])


def synthetic_batches(n=48, batch=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def plain_scores(model, configs, data):
    """The reference: set each configuration and run the whole model (what the tree must equal)."""
    out = []
    with torch.no_grad():
        for config in configs:
            gross.set_config(model, config)
            loss, correct, count = 0.0, 0, 0
            for x, y in data:
                logits = model(x)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                count += len(y)
            out.append((correct / count, loss / count))
    return out


# ---------------------------------------------------------------------------------------------
# Tree evaluation


def test_tree_equals_plain_on_every_paper_net_config():
    model = small_paper_net()
    data = synthetic_batches()
    configs = list(itertools.product(*gross.search_space(model)))
    random.Random(0).shuffle(configs)
    gross.set_config(model, configs[5])
    tree = S.evaluate_configs(model, configs, data, method="tree")
    plain = S.evaluate_configs(model, configs, data, method="plain")
    assert tree == plain  # bit for bit, loss included
    assert gross.get_config(model) == configs[5] and not model.training
    reference = plain_scores(model, configs[:10], data)
    assert [s.accuracy for s in tree[:10]] == [a for a, _ in reference]
    assert [s.loss for s in tree[:10]] == pytest.approx([loss for _, loss in reference], rel=1e-5)
    assert len({s.accuracy for s in tree}) > 3  # the configurations do differ


def test_tree_equals_plain_on_resnet20_with_batchnorm_and_residuals():
    torch.manual_seed(0)
    model = resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # running statistics that matter
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    random_gross(model, group_sizes=(1, 4, 16))
    space = gross.search_space(model)
    assert len(space) == 20 and space[0] == (1, 4, 16)
    rng = random.Random(0)
    configs = []
    # Shared prefixes of every length, so the tree branches at many depths.
    for _ in range(3):
        base = [rng.choice(s) for s in space]
        for depth in (2, 9, 15, 19):
            config = list(base)
            config[depth:] = [rng.choice(s) for s in space[depth:]]
            configs.append(tuple(config))
    data = synthetic_batches(n=16, batch=8)
    tree = S.evaluate_configs(model, configs, data, method="tree")
    plain = S.evaluate_configs(model, configs, data, method="plain")
    assert tree == plain
    reference = plain_scores(model, configs, data)
    assert [s.accuracy for s in tree] == [a for a, _ in reference]


def resnet20_configs_with_shared_prefixes(model, seed=0):
    space = gross.search_space(model)
    rng = random.Random(seed)
    configs = []
    for _ in range(2):
        base = [rng.choice(s) for s in space]
        for depth in (3, 12, 19):
            config = list(base)
            config[depth:] = [rng.choice(s) for s in space[depth:]]
            configs.append(tuple(config))
    return configs


def test_recalibrated_scores_equal_recalibrating_each_configuration_by_hand():
    torch.manual_seed(0)
    model = random_gross(resnet20(), group_sizes=(1, 4, 16))
    configs = resnet20_configs_with_shared_prefixes(model)
    data = synthetic_batches(n=16, batch=8)
    calibration = [x for x, _ in synthetic_batches(n=24, batch=12, seed=1)]
    before = gross.batchnorm_state(model)
    tree = S.evaluate_configs(model, configs, data, method="tree", calibration=calibration)
    plain = S.evaluate_configs(model, configs, data, method="plain", calibration=calibration)
    assert tree == plain
    # The model's own statistics are back.
    for a, b in zip(before, gross.batchnorm_state(model)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    reference = []
    for config in configs:
        gross.set_config(model, config)
        gross.recalibrate_batchnorm(model, calibration)
        reference += plain_scores(model, [config], data)
        gross.load_batchnorm_state(model, before)
    assert [s.accuracy for s in tree] == [a for a, _ in reference]
    assert [s.loss for s in tree] == pytest.approx([loss for _, loss in reference], rel=1e-5)
    # Recalibration changes the scores (the trained statistics are not each configuration's).
    assert tree != S.evaluate_configs(model, configs, data, method="tree")


def test_calibration_without_batchnorm_changes_nothing():
    model = small_paper_net()
    data = synthetic_batches()
    configs = list(itertools.product(*gross.search_space(model)))[:20]
    calibration = [x for x, _ in synthetic_batches(seed=2)]
    assert S.evaluate_configs(model, configs, data, calibration=calibration) == S.evaluate_configs(model, configs, data)
    with pytest.raises(ValueError, match="at least one batch"):
        S.evaluate_configs(model, configs, data, calibration=[])


def test_max_cache_bytes_cuts_batches_without_changing_accuracy():
    model = small_paper_net()
    data = synthetic_batches()
    configs = list(itertools.product(*gross.search_space(model)))[:40]
    evaluator = S.ConfigEvaluator(model, max_cache_bytes=20_000)
    bounded = evaluator(configs, data)
    assert 1 <= evaluator._rows_per_batch < 20
    full = S.evaluate_configs(model, configs, data)
    assert [s.accuracy for s in bounded] == [s.accuracy for s in full]
    # Summing sub-batch losses rounds differently.
    assert [s.loss for s in bounded] == pytest.approx([s.loss for s in full], rel=1e-5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = GroSSConv2d(4, 4, 3, padding=1, group_sizes=(1, 2, 4))
        self.b = GroSSConv2d(4, 4, 3, padding=1, group_sizes=(1, 4))
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)

    def forward(self, x):
        h = self.a(x[:, :4])
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = -h
        return self.b(h).mean((2, 3))


class InPlace(Untraceable):
    def forward(self, x):
        h = self.a(x[:, :4])
        out = self.b(h)
        h.mul_(2)  # modifies the first stage's value, which sibling branches still read
        return (out + h).mean((2, 3))


@pytest.mark.parametrize("cls", [Untraceable, InPlace])
def test_falls_back_to_plain_evaluation_with_a_warning(cls, caplog):
    torch.manual_seed(0)
    model = cls().eval()
    data = [(torch.randn(12, 4, 8, 8), torch.randint(0, 4, (12,)))]
    configs = list(itertools.product(*gross.search_space(model)))
    with caplog.at_level(logging.WARNING, logger="gross"):
        scores = S.evaluate_configs(model, configs, data)
    assert any("separately" in r.getMessage() for r in caplog.records)
    assert scores == S.evaluate_configs(model, configs, data, method="plain")
    with pytest.raises(ValueError, match="tree evaluation is impossible"):
        S.evaluate_configs(model, configs, data, method="tree")


def test_a_dataset_is_normalised_and_batched():
    model = small_paper_net()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=gen)
    dataset = Dataset(images, torch.randint(0, 10, (30,), generator=gen), tuple("0123456789"))
    configs = [(1, 2, 4), (8, 8, 16)]
    expected = S.evaluate_configs(model, configs, list(batches(dataset, 16)), method="plain")
    assert S.evaluate_configs(model, configs, dataset, batch_size=16) == expected
    assert S.evaluate_configs(model, configs, lambda: batches(dataset, 16)) == expected


def test_evaluate_rejects_invalid_configs():
    model = small_paper_net()
    with pytest.raises(ValueError, match="invalid"):
        S.evaluate_configs(model, [(3, 1, 1)], synthetic_batches())
    with pytest.raises(ValueError, match="entries"):
        S.evaluate_configs(model, [(1, 1)], synthetic_batches())


# ---------------------------------------------------------------------------------------------
# Costs and budgets


def test_macs_and_params_costs_match_counting_and_export():
    # A layer costs the cheaper of its bottleneck and its dense conv; exported with exactly the
    # layers the cost calls dense fused, the network has those MACs and parameters and the
    # GroSS network's outputs.
    model = small_paper_net()
    names = [name for name, _ in gross.gross_layers(model)]
    macs, params = S.macs_cost(model, (3, 32, 32)), S.params_cost(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen_dense = set()
    for config in [(1, 1, 1), (8, 4, 16), (2, 8, 4)]:
        assert macs.of(config) == gross.count_macs(model, (3, 32, 32), config).total  # every layer its bottleneck
        gross.set_config(model, config)
        for cost, count in ((macs, lambda m: gross.count_macs(m, (3, 32, 32)).total), (params, lambda m: sum(p.numel() for p in m.parameters()))):
            dense = [names[i] for i in cost.dense_layers(config)]
            seen_dense.update(dense)
            exported = gross.export(model, config, fuse=dense)
            assert cost(config) == count(exported)
            torch.testing.assert_close(exported(x), model(x))
    assert seen_dense == {"conv2", "conv4"}  # 8 of 8 and 16 of 16 channels: dearer than the dense conv


def test_the_dense_choice_costs_the_original_conv():
    original = PaperNet(widths=(8, 8, 16, 16))
    model = small_paper_net()
    table = gross.macs_table(model, (3, 32, 32))
    counted = gross.count_macs(original, (3, 32, 32)).per_layer
    assert table.dense == tuple(counted[name] for name in table.layers)
    assert table.cost((0, "dense", 1)) == sum(counted[n] for n in counted if n != "conv4") + table.options[2][1]
    # With the dense choice no layer costs more than the original conv, and no configuration
    # more than the original network; without it the largest sizes do.
    space = gross.search_space(model)
    with_dense, bottlenecks = S.macs_cost(model, (3, 32, 32)), S.macs_cost(model, (3, 32, 32), dense=False)
    total = sum(counted.values())
    assert max(with_dense(c) for c in itertools.product(*space)) <= total
    assert bottlenecks(tuple(s[-1] for s in space)) > total
    # uniform:G is the paper's uniform network, every layer its bottleneck, with or without it.
    assert S.resolve_budget("uniform:8", space, with_dense) == bottlenecks((8, 8, 8)) > with_dense((8, 8, 8))
    # P% is of the original network's MACs, counted on the network before decomposition.
    assert S.resolve_budget("65%", space, with_dense) == pytest.approx(0.65 * total)
    assert S.resolve_budget(" 100 % ", space, with_dense) == pytest.approx(total)
    with pytest.raises(ValueError, match="a percentage needs the original network's cost"):
        S.resolve_budget("65%", space, bottlenecks)


def test_uniform_budget_takes_the_largest_valid_size_below():
    space = ((1, 2, 4, 8), (1, 4, 16, 32), (32, 64))
    assert S.uniform_config(space, 16) == (8, 16, 32)
    cost = S.AdditiveCost(0, tuple({s: s for s in sizes} for sizes in space))
    assert S.resolve_budget("uniform:16", space, cost) == 8 + 16 + 32
    assert S.resolve_budget(" 1e3 ", space, cost) == 1000.0
    assert S.resolve_budget(100, space, cost) == 100.0
    assert S.resolve_budget(None, space, cost) == math.inf
    assert S.resolve_budget("uniform:4", space, lambda c: sum(c)) == 4 + 4 + 32


@pytest.mark.parametrize("budget", ["uniform16", "fast", "uniform:x", "uniform:0", "macs<5", "%", "x%", "-5%", "0%"])
def test_unknown_budget_strings_are_rejected(budget):
    cost = S.AdditiveCost(0, ({1: 1, 2: 2},))
    with pytest.raises(ValueError, match="budget"):
        S.resolve_budget(budget, ((1, 2),), cost)


def test_budget_below_the_cheapest_configuration_is_rejected():
    cost = S.AdditiveCost(10, ({1: 1, 2: 2}, {1: 5, 4: 3}))  # cheapest: (1, 4) at 14
    with pytest.raises(ValueError, match=r"below the cheapest configuration 1-4 \(cost 14\)"):
        S.resolve_budget(13, ((1, 2), (1, 4)), cost)
    assert S.resolve_budget(14, ((1, 2), (1, 4)), cost) == 14


def test_empty_spaces_are_rejected():
    cost = S.AdditiveCost(0, ())
    with pytest.raises(ValueError, match="search space is empty"):
        S.resolve_budget(1, (), cost)
    with pytest.raises(ValueError, match="search space is empty"):
        S.Objective(((1, 2), ()), lambda cs: [0.0] * len(cs), cost, 1.0)
    with pytest.raises(ValueError, match="no GroSS layers"):
        S.search(PaperNet(), synthetic_batches(), progress=False)


# ---------------------------------------------------------------------------------------------
# Strategies


def paper_cost():
    """The MACs of the paper network's conv2-conv4 bottlenecks (16x16, 8x8, 4x4 outputs)."""

    def terms(c_in, c_out, pixels, sizes):
        return {s: pixels * (c_in * c_in + c_in * s * 9 + c_out * c_in) for s in sizes}

    return S.AdditiveCost(
        base=1_000_000,
        terms=(
            terms(32, 32, 256, PAPER_SPACE[0]),
            terms(32, 64, 64, PAPER_SPACE[1]),
            terms(64, 64, 16, PAPER_SPACE[2]),
        ),
        name="macs",
    )


def synthetic_scorer(seed, noise=0.0005):
    """Accuracy that saturates with every layer's group size, plus a fixed per-configuration noise."""
    rng = random.Random(seed)
    gain = [rng.uniform(0.002, 0.02) for _ in PAPER_SPACE]
    rate = [rng.uniform(0.3, 1.0) for _ in PAPER_SPACE]
    jitter = {c: rng.gauss(0, noise) for c in itertools.product(*PAPER_SPACE)}

    def score(configs):
        return [
            0.8 + sum(g * (1 - math.exp(-r * math.log2(s))) for g, r, s in zip(gain, rate, c)) + jitter[c]
            for c in configs
        ]

    return score


@pytest.mark.parametrize("budget", [2.0e6, "uniform:1", "uniform:4", "uniform:16", 3.0e6, None])
def test_exhaustive_enumerates_exactly_the_configs_within_budget(budget):
    cost = paper_cost()
    limit = S.resolve_budget(budget, PAPER_SPACE, cost)
    brute = [c for c in itertools.product(*PAPER_SPACE) if cost(c) <= limit]
    assert list(S.feasible_configs(PAPER_SPACE, cost, limit)) == brute
    # A cost without additive structure goes through the whole product, to the same result.
    assert list(S.feasible_configs(PAPER_SPACE, lambda c: cost(c), limit)) == brute
    objective = S.Objective(PAPER_SPACE, synthetic_scorer(0), cost, limit)
    best, score = S.exhaustive(objective)
    assert list(objective.scores) == brute
    assert score == max(objective.scores.values()) and cost(best) <= limit


class CountedCost(S.AdditiveCost):
    calls = 0

    def __call__(self, config):
        CountedCost.calls += 1
        return super().__call__(config)


def test_exhaustive_prunes_without_walking_the_product():
    space = ((1, 2, 4, 8),) * 12  # 16.7 million configurations
    cost = CountedCost(0, tuple({s: s for s in sizes} for sizes in space))
    feasible = list(S.feasible_configs(space, cost, 14))  # all ones, or one or two layers at 2
    assert len(feasible) == 1 + 12 + 66
    assert CountedCost.calls == len(feasible)  # only complete configurations within budget are costed
    assert all(cost(c) <= 14 for c in feasible)
    with pytest.raises(ValueError, match="more than 50"):
        S.exhaustive(S.Objective(space, lambda cs: [0.0] * len(cs), cost, 14), max_configs=50)


@pytest.mark.parametrize("seed", range(5))
def test_beam_is_within_0_2_points_of_the_optimum_using_a_quarter_of_the_space(seed):
    cost = paper_cost()
    score = synthetic_scorer(seed)
    limit = S.resolve_budget("uniform:16", PAPER_SPACE, cost)
    _, optimum = S.exhaustive(S.Objective(PAPER_SPACE, score, cost, limit))
    objective = S.Objective(PAPER_SPACE, score, cost, limit)
    config, found = S.beam(objective)
    assert optimum - found <= 0.002
    assert objective.evaluations <= 252 // 4
    assert cost(config) <= limit and all(cost(c) <= limit for c in objective.scores)


def test_evolution_respects_budget_and_evaluation_limit_and_finds_a_good_config():
    cost = paper_cost()
    score = synthetic_scorer(1)
    limit = S.resolve_budget("uniform:4", PAPER_SPACE, cost)
    _, optimum = S.exhaustive(S.Objective(PAPER_SPACE, score, cost, limit))
    objective = S.Objective(PAPER_SPACE, score, cost, limit)
    _, found = S.evolution(objective, max_evaluations=40, seed=3)
    assert objective.evaluations == 40
    assert all(cost(c) <= limit for c in objective.scores)
    assert optimum - found <= 0.004


@pytest.mark.parametrize("strategy,options", [("beam", {"width": 3}), ("evolution", {"max_evaluations": 30})])
def test_strategies_are_deterministic(strategy, options):
    cost = paper_cost()
    limit = S.resolve_budget("uniform:8", PAPER_SPACE, cost)
    runs = []
    for _ in range(2):
        objective = S.Objective(PAPER_SPACE, synthetic_scorer(2), cost, limit)
        best = S.STRATEGIES[strategy](objective, **options)
        runs.append((best, list(objective.scores.items())))
    assert runs[0] == runs[1]
    if strategy == "evolution":
        other = S.Objective(PAPER_SPACE, synthetic_scorer(2), cost, limit)
        S.evolution(other, max_evaluations=30, seed=1)
        assert list(other.scores) != [c for c, _ in runs[0][1]]


def test_evolution_samples_tight_budgets_by_shrinking():
    cost = paper_cost()
    limit = cost((1, 2, 1))  # a handful of configurations fit
    objective = S.Objective(PAPER_SPACE, synthetic_scorer(0), cost, limit)
    S.evolution(objective, max_evaluations=100, seed=0, tries=5)
    assert set(objective.scores) == set(S.feasible_configs(PAPER_SPACE, cost, limit))


def test_objective_rejects_configs_over_budget_and_scores_each_once():
    calls = []
    cost = S.AdditiveCost(0, ({1: 1, 2: 2}, {1: 1, 2: 2}))

    def score(configs):
        calls.append(list(configs))
        return [float(sum(c)) for c in configs]

    objective = S.Objective(((1, 2), (1, 2)), score, cost, 3, known={(1, 1): 7.0})
    assert objective([(1, 2), (1, 1), (1, 2)]) == [3.0, 7.0, 3.0]
    assert objective([(2, 1), (1, 2)]) == [3.0, 3.0]
    assert calls == [[(1, 2)], [(2, 1)]] and objective.evaluations == 3
    assert objective.best() == ((1, 1), 7.0)
    with pytest.raises(ValueError, match="above the limit"):
        objective([(2, 2)])


# ---------------------------------------------------------------------------------------------
# search(): results on disk, resume, distributed


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_search_writes_csv_and_summary(tmp_path):
    model = small_paper_net()
    val, test = synthetic_batches(seed=0), synthetic_batches(n=20, seed=1)
    result = S.search(model, val, budget="uniform:4", test_data=test, out_dir=tmp_path, chunk_size=16, progress=False)
    macs = S.macs_cost(model, (3, 32, 32))
    feasible = list(S.feasible_configs(gross.search_space(model), macs, result.limit))
    assert result.limit == macs((4, 4, 4)) and result.cost_name == "macs"
    rows = read_rows(tmp_path / "results.csv")
    assert list(rows[0]) == ["config", "cost", "macs", "params", "val_accuracy", "val_loss", "test_accuracy", "dense"]
    assert sorted(S.parse_config(r["config"]) for r in rows) == sorted(feasible)
    params = S.params_cost(model)
    names = [name for name, _ in gross.gross_layers(model)]
    expected = dict(zip(feasible, S.evaluate_configs(model, feasible, val)))
    expected_test = dict(zip(feasible, S.evaluate_configs(model, feasible, test)))
    for row in rows:
        config = S.parse_config(row["config"])
        assert row["config"] == "-".join(map(str, config))
        dense = macs.dense_layers(config)
        assert int(row["macs"]) == macs(config) == float(row["cost"]) <= result.limit
        assert int(row["params"]) == params.of(config, dense)
        assert row["dense"].split() == [names[i] for i in dense]
        assert float(row["val_accuracy"]) == expected[config].accuracy
        assert float(row["val_loss"]) == expected[config].loss
        assert float(row["test_accuracy"]) == expected_test[config].accuracy
    summary = json.loads((tmp_path / "best.json").read_text())
    assert summary["finished"] and summary["best_config"] == S.format_config(result.best.config)
    assert summary["evaluations"] == len(feasible) == result.evaluations == result.evaluated_now
    best = max(expected, key=lambda c: (expected[c].accuracy, -macs(c)))
    assert result.best.config == best


def test_search_under_a_latency_table(tmp_path):
    model = small_paper_net()
    space = gross.search_space(model)
    # Made-up timings in which small groups are slow, as depthwise convs are on many CPUs.
    options = tuple({**{s: 1.0 + 4.0 / s for s in sizes}, "dense": 1.5} for sizes in space)
    table = LatencyTable(tuple(n for n, _ in gross.gross_layers(model)), options, 2.0, ((1, 8, 16, 16),) * 3)
    result = S.search(model, synthetic_batches(), cost=table, budget="uniform:2", progress=False)
    # The dense conv timed, it is a per-layer choice; uniform:2 is still every layer's bottleneck at 2.
    fused = S.AdditiveCost.from_latency_table(table, fuse=True)
    assert result.cost_name == S.FUSED_LATENCY and result.limit == table.cost((2, 2, 2))
    assert {r.config for r in result.records} == {c for c in itertools.product(*space) if fused(c) <= result.limit}
    assert all(r.cost == fused(r.config) for r in result.records)
    assert all(set(r.dense) == table.fused_faster(r.config) for r in result.records)
    assert any(r.dense for r in result.records)
    without = LatencyTable(table.layers, tuple({s: o[s] for s in sizes} for o, sizes in zip(options, space)), 2.0, table.input_shapes)
    result = S.search(model, synthetic_batches(), cost=without, budget="uniform:2", progress=False)
    assert result.cost_name == "latency_ms" and not any(r.dense for r in result.records)
    assert {r.config for r in result.records} == {c for c in itertools.product(*space) if table.cost(c) <= result.limit}


@pytest.mark.parametrize("strategy, options", [("exhaustive", {}), ("beam", {"width": 2}), ("evolution", {"max_evaluations": 30})])
def test_every_strategy_searches_with_the_dense_choice(tmp_path, strategy, options):
    # At uniform:8, conv2 (8 channels) at 8 costs more as a bottleneck than as its dense conv:
    # configurations the bottlenecks alone could not afford fit once it stays dense.
    model = small_paper_net()
    space, names = gross.search_space(model), [name for name, _ in gross.gross_layers(model)]
    val = synthetic_batches()
    macs, bottlenecks = S.macs_cost(model, (3, 32, 32)), S.macs_cost(model, (3, 32, 32), dense=False)
    result = S.search(model, val, strategy=strategy, budget="uniform:8", out_dir=tmp_path, progress=False, **options)
    assert result.limit == bottlenecks((8, 8, 8))
    fits = {c for c in itertools.product(*space) if macs(c) <= result.limit}
    assert fits > {c for c in itertools.product(*space) if bottlenecks(c) <= result.limit}
    scored = {r.config: r for r in result.records}
    assert set(scored) <= fits and (strategy != "exhaustive" or set(scored) == fits)
    for config, r in scored.items():
        assert r.cost == r.macs == macs(config) and r.dense == tuple(names[i] for i in macs.dense_layers(config))
    assert any(r.dense for r in scored.values())
    # The scores are those of the GroSS network (tree evaluation); the network exported with the
    # dense layers fused has the same outputs and exactly the MACs the search counted.
    best = result.best
    assert best.val_accuracy == S.evaluate_configs(model, [best.config], val, method="plain")[0].accuracy
    exported = gross.export(model, best.config, fuse=best.dense)
    assert gross.count_macs(exported, (3, 32, 32)).total == best.macs
    gross.set_config(model, best.config)
    torch.testing.assert_close(exported(val[0][0]), model(val[0][0]))
    summary = json.loads((tmp_path / "best.json").read_text())
    assert summary["best"]["dense"] == list(best.dense) and summary["dense_choice"]


def test_latency_cost_with_the_dense_conv_as_a_per_layer_choice():
    model = small_paper_net()
    space = gross.search_space(model)
    # Every bottleneck slower than the dense conv except group size 1 of the first layer.
    options = tuple({**{s: 2.0 + s / 10 for s in sizes}, "dense": 1.0} for sizes in space)
    options[0][1] = 0.5
    table = LatencyTable(tuple(n for n, _ in gross.gross_layers(model)), options, 2.0, ((1, 8, 16, 16),) * 3)
    fused = S.AdditiveCost.from_latency_table(table, fuse=True)
    assert fused.name == S.FUSED_LATENCY
    for config in itertools.product(*space):
        assert fused(config) == pytest.approx(2.0 + sum(min(o[s], o["dense"]) for o, s in zip(options, config)))
    # Under the original's latency every configuration fits once fused, the bottleneck of
    # conv2 at size 1 being the one layer that beats its dense conv.
    original = S.AdditiveCost.from_latency_table(table)(["dense"] * 3)
    assert all(fused(c) <= original for c in itertools.product(*space))
    assert S.resolve_budget(original - 0.4, space, fused) == original - 0.4  # only with conv2 at 1
    with pytest.raises(ValueError, match="below the cheapest"):
        S.resolve_budget(original - 0.6, space, fused)
    with pytest.raises(ValueError, match="dense timings"):
        S.AdditiveCost.from_latency_table(LatencyTable(table.layers, tuple({1: 1.0, 2: 1.0} for _ in space), 2.0, table.input_shapes), fuse=True)


def test_test_accuracy_is_only_measured_on_request(tmp_path):
    model = small_paper_net()
    S.search(model, synthetic_batches(), strategy="beam", out_dir=tmp_path, progress=False)
    assert all(r["test_accuracy"] == "" for r in read_rows(tmp_path / "results.csv"))


def test_interrupted_search_resumes_without_rescoring(tmp_path, monkeypatch):
    model = small_paper_net()
    data = synthetic_batches()
    options = dict(strategy="evolution", budget="uniform:8", max_evaluations=30, population=8, seed=4)
    reference = S.search(model, data, chunk_size=4, progress=False, **options)
    calls = 0
    original = S.ConfigEvaluator.__call__

    def interrupted(self, configs, data, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return original(self, configs, data, **kwargs)

    monkeypatch.setattr(S.ConfigEvaluator, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.search(model, data, out_dir=tmp_path, chunk_size=4, progress=False, **options)
    assert len(read_rows(tmp_path / "results.csv")) == 12
    assert not json.loads((tmp_path / "best.json").read_text())["finished"]
    monkeypatch.setattr(S.ConfigEvaluator, "__call__", original)
    resumed = S.search(model, data, out_dir=tmp_path, chunk_size=4, progress=False, **options)
    assert resumed.evaluated_now == 30 - 12
    assert resumed.records == reference.records and resumed.best == reference.best
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 30 and len({r["config"] for r in rows}) == 30


def test_results_written_before_the_dense_column_are_reused(tmp_path, monkeypatch):
    model = small_paper_net()
    data = synthetic_batches()
    first = S.search(model, data, budget="uniform:8", out_dir=tmp_path, progress=False)
    rows = read_rows(tmp_path / "results.csv")
    with open(tmp_path / "results.csv", "w", newline="") as f:  # as an older gross wrote it
        writer = csv.DictWriter(f, fieldnames=list(rows[0])[:-1], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(S.ConfigEvaluator, "__call__", lambda *a, **k: pytest.fail("scored again"))
    again = S.search(model, data, budget="uniform:8", out_dir=tmp_path, progress=False)
    assert again.evaluated_now == 0 and again.records == first.records
    assert read_rows(tmp_path / "results.csv") == rows  # written again, with the dense column


def fabricated_scores(monkeypatch, accuracy):
    """Scores set by ``accuracy(config)``, so that a test can mislead a strategy on purpose."""
    monkeypatch.setattr(
        S.ConfigEvaluator, "__call__", lambda self, configs, data, **kw: [S.Score(accuracy(c), 1.0) for c in configs]
    )


def assert_nothing_scored_beats(result, rows):
    """No configuration scored (anywhere) within the budget has a higher val accuracy than the pick."""
    for row in rows:
        if float(row["cost"]) <= result.limit:
            assert float(row["val_accuracy"]) <= result.best.val_accuracy, row


def test_search_picks_the_best_of_everything_scored_within_the_budget(tmp_path, monkeypatch):
    model = small_paper_net()
    space = gross.search_space(model)
    uniform_1 = S.uniform_config(space, 1)
    # Larger sizes score higher, so a width-1 beam never tries the all-ones configuration;
    # that one scores best of all.
    fabricated_scores(monkeypatch, lambda c: 0.9 if c == uniform_1 else sum(c) / 100)
    options = dict(strategy="beam", budget="uniform:8", width=1, progress=False)
    alone = S.search(model, synthetic_batches(), **options)
    assert uniform_1 not in {r.config for r in alone.records} and alone.best.val_accuracy < 0.9
    # The uniform baselines given as extra configurations are scored, recorded and chosen.
    uniform = [S.uniform_config(space, g) for g in (1, 2, 4, 8, 16)]
    result = S.search(model, synthetic_batches(), out_dir=tmp_path / "extra", extra=uniform, **options)
    assert result.best.config == uniform_1 and {r.config for r in result.records} >= set(uniform)
    rows = read_rows(tmp_path / "extra" / "results.csv")
    assert {S.parse_config(r["config"]) for r in rows} >= set(uniform)
    assert json.loads((tmp_path / "extra" / "best.json").read_text())["best"]["config"] == list(uniform_1)
    assert_nothing_scored_beats(result, rows)
    # Scores taken from an earlier search's results.csv (another budget) count as well.
    S.search(model, synthetic_batches(), strategy="exhaustive", budget=None, out_dir=tmp_path / "csv", progress=False)
    result = S.search(model, synthetic_batches(), out_dir=tmp_path / "csv", **options)
    assert result.best.config == uniform_1 and result.evaluated_now == 0
    assert_nothing_scored_beats(result, read_rows(tmp_path / "csv" / "results.csv"))


def test_resume_drops_a_row_cut_short(tmp_path):
    model = small_paper_net()
    data = synthetic_batches()
    full = S.search(model, data, budget="uniform:2", out_dir=tmp_path, progress=False)
    lines = (tmp_path / "results.csv").read_text().splitlines()
    (tmp_path / "results.csv").write_text("\n".join(lines[:-1] + [lines[-1][:12]]))  # a write cut short
    resumed = S.search(model, data, budget="uniform:2", out_dir=tmp_path, progress=False)
    assert resumed.evaluated_now == 1 and resumed.records == full.records
    assert len(read_rows(tmp_path / "results.csv")) == full.evaluations


def test_resume_refuses_results_of_another_space(tmp_path):
    (tmp_path / "results.csv").write_text(
        "config,cost,macs,params,val_accuracy,val_loss,test_accuracy\n3-3,1,1,1,0.5,1.0,\n"
    )
    with pytest.raises(ValueError, match="another search"):
        S.search(small_paper_net(), synthetic_batches(), out_dir=tmp_path, progress=False)


def test_search_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        S.search(small_paper_net(), synthetic_batches(), strategy="random", progress=False)


def _distributed_worker(rank, world, out):
    torch.set_num_threads(1)
    # A file rendezvous: no port to choose, free now and taken by someone else by the time it is bound.
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    scored = []
    evaluate = S.ConfigEvaluator._evaluate

    def counted(self, configs, *args):
        scored.extend(configs)
        return evaluate(self, configs, *args)

    S.ConfigEvaluator._evaluate = counted
    try:
        result = S.search(
            small_paper_net(), synthetic_batches(), strategy="beam", budget="uniform:4",
            out_dir=out / "run", chunk_size=8, progress=False,
        )  # fmt: skip
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps((result.records, scored)))
    finally:
        dist.destroy_process_group()


def test_distributed_search_equals_single_process(tmp_path):
    mp.spawn(_distributed_worker, args=(2, tmp_path), nprocs=2)
    single = S.search(
        small_paper_net(), synthetic_batches(), strategy="beam", budget="uniform:4", chunk_size=8, progress=False
    )
    mine = []
    for rank in range(2):
        records, scored = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert records == single.records
        mine.append(set(scored))
    # Each process scored its own share of the configurations.
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == {r.config for r in single.records}
    assert len(read_rows(tmp_path / "run" / "results.csv")) == single.evaluations


@pytest.mark.parametrize("strategy, options", [("exhaustive", {}), ("beam", {"width": 1})])
def test_a_configuration_exactly_at_the_budget_is_picked(strategy, options, monkeypatch):
    # "Within the budget" includes the budget itself: the uniform configuration that defines the
    # budget costs exactly the limit, scores best of all, and must be the pick.
    model = small_paper_net()
    at_budget = S.uniform_config(gross.search_space(model), 4)
    fabricated_scores(monkeypatch, lambda c: 0.9 if c == at_budget else sum(c) / 1000)
    result = S.search(
        model, synthetic_batches(), strategy=strategy, budget="uniform:4", extra=[at_budget], progress=False, **options
    )  # fmt: skip
    scored = {r.config: r for r in result.records}
    assert scored[at_budget].cost == result.limit
    assert result.best.config == at_budget
