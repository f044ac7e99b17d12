"""Pareto front on a hand example; the report's files and tables."""

import csv

import pytest

from gross.report import pareto_front, read_results, write_report


def rows():
    #  config        macs   val_acc   on the front?
    return [
        {"config": (1, 1, 1), "macs": 1.0e6, "val_acc": 0.70},  # yes: cheapest
        {"config": (1, 1, 2), "macs": 1.0e6, "val_acc": 0.65},  # no: same cost, worse
        {"config": (2, 1, 1), "macs": 1.5e6, "val_acc": 0.70},  # no: costs more, scores the same
        {"config": (1, 2, 2), "macs": 2.0e6, "val_acc": 0.80},  # yes
        {"config": (2, 2, 2), "macs": 2.5e6, "val_acc": 0.78},  # no: (1, 2, 2) is cheaper and better
        {"config": (4, 4, 4), "macs": 3.0e6, "val_acc": 0.85},  # yes
        {"config": (4, 4, 8), "macs": 3.0e6, "val_acc": 0.85},  # no: duplicate of the one above
        {"config": (8, 8, 8), "macs": 4.0e6, "val_acc": float("nan")},  # ignored: no score
        {"config": (4, 8, "dense"), "macs": 5.0e6, "val_acc": 0.90, "test_acc": 0.89},  # yes
    ]


def test_pareto_front_hand_example():
    front = pareto_front(rows())
    assert [r["config"] for r in front] == [(1, 1, 1), (1, 2, 2), (4, 4, 4), (4, 8, "dense")]
    assert pareto_front([]) == []
    by_test = pareto_front(rows(), "macs", "test_acc")
    assert [r["config"] for r in by_test] == [(4, 8, "dense")]


def test_pareto_front_other_keys():
    data = [{"config": (i,), "ms": ms, "acc": acc} for i, (ms, acc) in enumerate([(3, 0.9), (1, 0.5), (2, 0.4)])]
    assert [r["config"] for r in pareto_front(data, "ms", "acc")] == [(1,), (0,)]


def test_write_report_files_and_tables(tmp_path):
    data = rows()
    for i, row in enumerate(data):
        row["latency_ms"] = 1.0 + i / 10
    path = write_report(
        data,
        tmp_path,
        networks=[
            {"network": "original", "config": ("-",), "val_acc": 0.9, "macs": 5e6, "params": 12000, "ms": 2.0,
             "setup": "onnxruntime, batch 64, 2 threads, cpu", "versus": ""},
            {"network": "exported", "config": (1, 2, 2), "val_acc": 0.8, "macs": 2e6, "params": 3000, "ms": 0.5,
             "setup": "onnxruntime, batch 64, 2 threads, cpu", "versus": "4.00x faster"},
        ],
        notes=["The exported network is faster."],
        layer_names=["conv2", "conv3", "conv4"],
        title="Test run",
    )
    assert path == tmp_path / "report.md"
    for name in ("pareto.png", "front_group_sizes.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 1000
    text = path.read_text()
    assert text.startswith("# Test run")
    assert "| 1 2 2 | 2.000 | 0.8 |" in text  # MACs in millions
    # Uniform configurations are found by default, and their costs are the budgets.
    assert "| uniform 4 | 4 4 4 |" in text and "| uniform 8 | 8 8 8 |" in text
    assert "| uniform 1 (<= 1.000) | 1 1 1 |" in text
    # Measured end to end, beside MACs and parameters, naming where.
    assert "| network | config | val acc | MACs (M) | params | measured ms (end to end) | measured with | against the original |" in text
    assert "| exported | 1 2 2 | 0.8 | 2.000 | 3.0k | 0.5 | onnxruntime, batch 64, 2 threads, cpu | 4.00x faster |" in text
    assert "\nThe exported network is faster.\n" in text
    assert "test acc" in text and "latency (ms)" in text


def test_write_report_from_csv_with_budgets(tmp_path):
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "macs", "val_acc"])
        for row in rows():
            writer.writerow([" ".join(map(str, row["config"])), row["macs"], row["val_acc"]])
    assert read_results(path)[8]["config"] == (4, 8, "dense")
    report = write_report(path, tmp_path / "out", uniform={"fixed 2": (2, 2, 2)}, budgets={"small": 2.1e6, "tiny": 0.5e6})
    text = report.read_text()
    assert "| small (<= 2.100) | 1 2 2 |" in text
    assert "| tiny (<= 0.500) | none |" in text
    assert "| fixed 2 | 2 2 2 |" in text
    assert not (tmp_path / "out" / "latency.png").exists()


def test_write_report_rejects_empty_and_unscored(tmp_path):
    with pytest.raises(ValueError):
        write_report([], tmp_path)
    with pytest.raises(ValueError):
        write_report([{"config": (1,), "macs": 1}], tmp_path)


def test_reads_the_search_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "config,cost,macs,params,val_accuracy,val_loss,test_accuracy\n"
        "1-1-1,1000000.0,1000000,5000,0.5,1.2,\n"
        "2-4-8,2000000.0,2000000,6000,0.75,0.9,0.74\n"
    )
    report = write_report(path, tmp_path / "out")
    assert "| 2 4 8 | 2.000 | 0.75 | 0.74 |" in report.read_text()


def test_the_report_says_which_layers_stay_dense(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "config,cost,macs,params,val_accuracy,val_loss,test_accuracy,dense\n"
        "1-1-1,1000000.0,1000000,5000,0.5,1.2,0.5,\n"
        "2-4-8,2000000.0,2000000,6000,0.75,0.9,0.7,conv2 conv4\n"
    )
    text = write_report(path, tmp_path / "out", layer_names=["conv2", "conv3", "conv4"]).read_text()
    assert "| config | MACs (M) | val acc | test acc | params | dense layers |" in text
    assert "| 1 1 1 | 1.000 | 0.5 | 0.5 | 5.0k |  |" in text
    assert "| 2 4 8 | 2.000 | 0.75 | 0.7 | 6.0k | conv2, conv4 |" in text
    assert "dense layers: kept as one dense conv" in text
    # Without any dense layer the column is left out.
    plain = write_report([{"config": (1,), "macs": 1.0, "val_acc": 0.5}], tmp_path / "plain").read_text()
    assert "dense" not in plain
