"""`dfkd bench` runs every section on the tiny CI models and writes numbers that make sense.

Speed targets are checked by reading the benchmark's output (docs/BENCHMARKS.md), not here:
a timed assertion on a shared CI machine would measure the machine, not the code.
"""

import json

from dfkd_assets.cli import main


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
