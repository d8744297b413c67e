"""`dfkd bench` runs every section on the tiny CI models and writes numbers that make sense.

Speed targets are checked by reading the benchmark's output (docs/BENCHMARKS.md), not here:
a timed assertion on a shared CI machine would measure the machine, not the code.
"""

import json

from dfkd_assets.tools.cli import main


def test_bench_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--config", "configs/ci.yaml", "--device", "cpu", "--images", "4", "--batch", "4", "--iters", "2",
               "--distill-images", "16", "--distill-epochs", "1", "--students", "resnet18", "--latency-size", "32", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    for section in ("synthesis", "flops", "profile", "distill", "load", "latency"):
        assert "error" not in r[section], r[section]
    ref, engine = r["synthesis"]["rows"][:2]
    assert ref["batch"] == 1 and engine["batch"] == 4
    assert abs(ref["cosine"] - engine["cosine"]) < 1e-4  # same seeds, same algorithm: same images
    assert r["flops"]["flops_per_image_step"] > 1e6
    by_module = r["flops"]["flops_per_image_step_by_module"]  # the image tower and the decoder carry the FLOPs
    assert len(by_module) >= 2 and sum(by_module.values()) > 0.9 * r["flops"]["flops_per_image_step"]
    prof = r["profile"]
    assert abs(sum(prof["by_kind"].values()) - 1) < 1e-6 and prof["by_kind"]["convolution"] > 0.05  # the decoder's convs
    assert prof["top"] and all(row["seconds"] > 0 for row in prof["top"])
    assert r["distill"]["augmented_images_per_s"] > 0 and abs(sum(r["distill"]["step_share"].values()) - 1) < 1e-6
    assert 0 < r["load"]["load_share_of_compute"]
    assert {row["runtime"] for row in r["latency"]["rows"]} == {"pytorch", "onnxruntime"}
    assert "reference loop" in capsys.readouterr().out


def test_quality_counts_synthesis_flops_and_finds_the_cheapest_schedule_at_equal_accuracy(tmp_path, capsys):
    """Two schedules through the product's stages: halving the steps halves the synthesis FLOPs exactly,
    both students are evaluated, the JSON names the ratio and the PNG curve is written."""
    from conftest import make_workspace

    cfg_path = make_workspace(tmp_path)
    out = tmp_path / "quality.json"
    rc = main(["bench", "--config", str(cfg_path), "--sections", "quality", "--seeds", "0", "--work", str(tmp_path / "work"),
               "--schedule", "today", "--schedule", "half", "synthesis.iterations=5", "distill.epochs=1", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["quality"]
    assert "error" not in r, r
    flops = r["synthesis"]
    assert flops["today"]["iterations"] == 10 and flops["half"]["iterations"] == 5
    assert abs(flops["today"]["flops"] / flops["half"]["flops"] - 2) < 1e-9
    assert set(r["summary"]) == {"today", "half"} and len(r["runs"]) == 2
    assert r["schedules"]["today"]["reaches_baseline"] and r["schedules"]["today"]["compute_ratio"] == 1
    assert r["compute_ratio_at_equal_accuracy"] in (1, 2)
    assert r["compute_ratio_at_equal_accuracy"] == (2 if r["schedules"]["half"]["reaches_baseline"] else 1)
    assert all(r["summary"][k]["distill_s"] > 0 for k in ("today", "half"))
    assert r["kd_time_ratio_at_equal_accuracy"] >= r["schedules"]["today"]["kd_time_ratio"] == 1
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "compute_ratio_at_equal_accuracy" in printed and "kd_time_ratio_at_equal_accuracy" in printed


def test_equal_accuracy_counts_only_schedules_within_the_baselines_spread():
    from dfkd_assets.tools.bench import equal_accuracy

    summary = {"today": {"mean": (0.60, 0.02), "synthesis_flops": 100.0, "distill_s": 600.0},
               "fifth": {"mean": (0.585, 0.05), "synthesis_flops": 20.0, "distill_s": 400.0},   # within 0.60 - 0.02
               "tenth": {"mean": (0.57, 0.01), "synthesis_flops": 10.0, "distill_s": 100.0}}    # below it: cheaper but worse
    r = equal_accuracy(summary, "today")
    assert r["schedules"]["fifth"]["reaches_baseline"] and not r["schedules"]["tenth"]["reaches_baseline"]
    assert r["compute_ratio_at_equal_accuracy"] == 5
    assert r["kd_time_ratio_at_equal_accuracy"] == 1.5  # not 6: the fastest schedule is worse


def test_kd_time_ratio_needs_every_schedules_kd_timed_from_scratch():
    """A schedule whose KD resumed from --work has no KD time of its own: no ratio is claimed."""
    from dfkd_assets.tools.bench import equal_accuracy

    summary = {"today": {"mean": (0.60, 0.02), "synthesis_flops": 100.0, "distill_s": 600.0},
               "pool": {"mean": (0.61, 0.02), "synthesis_flops": 100.0}}  # resumed: no distill_s
    r = equal_accuracy(summary, "today")
    assert "kd_time_ratio_at_equal_accuracy" not in r and r["compute_ratio_at_equal_accuracy"] == 1


def test_deploy_rows_of_one_shape(teacher):
    """The deploy section's four rows at the CI shape: the int8 file is about a quarter of fp32's, the
    student's MACs are the same in every runtime, the teacher row is the reference of the speed-ups."""
    from dfkd_assets.tools.bench import bench_deploy_shape

    rows = bench_deploy_shape("ci", teacher, ["a", "b", "c"], "resnet10t", 32, None, threads=(1,), repeats=2)
    assert [r["runtime"] for r in rows] == ["pytorch fp32", "pytorch fp32", "onnxruntime fp32", "onnxruntime int8"]
    assert rows[3]["file_mib"] < 0.3 * rows[2]["file_mib"]
    assert rows[1]["gmacs_per_image"] == rows[2]["gmacs_per_image"] == rows[3]["gmacs_per_image"] > 0
    assert rows[0]["gmacs_per_image"] > 0 and rows[0]["b1_speedup_vs_teacher_1t"] == 1
    assert all(r["b1_p50_ms_1t"] > 0 and r["b32_images_per_s_1t"] > 0 for r in rows)
