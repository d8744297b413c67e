"""int8 against fp32 on the students of a `dfkd compare` / `dfkd bench --sections quality` work folder
(issue 38's accuracy acceptance: every domain within `quantization.max_top1_drop`, over seeds).

For each seed: the run's synthetic images and its finished student are taken from the work folder
(both resume without computing anything; a student that is not finished is refused), the images are
written as class shards into a temporary workspace (the only calibration data), and the product's
stage `stages.deployment.quantize_and_compare` exports, quantizes and scores fp32 and int8 ONNX on the
settings' evaluation sets. With `--set quantization.qat_epochs=N` the stage first fine-tunes a copy of
the student quantization-aware on those shards (the teacher's soft labels) and quantizes that; int8
is still compared with the student's own fp32.

    .venv/bin/python scripts/int8_seeds.py --config configs/demo.yaml --work storage/bench-kd/today --seeds 0 1 2 \
        --json docs/bench/deploy/int8_demo_seeds.json
    .venv/bin/python scripts/int8_seeds.py --config configs/demo.yaml --work storage/bench-kd/today --seeds 0 1 2 \
        --set quantization.qat_epochs=10 --json docs/bench/deploy/int8_demo_seeds_qat10.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    from dfkd_assets import artifacts
    from dfkd_assets.config import deep_merge, load_config
    from dfkd_assets.core.export import export_onnx
    from dfkd_assets.stages.deployment import quantize_and_compare
    from dfkd_assets.tools.compare import _variant, distill_variant, parse_sets, synthesize_classes, teacher_reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    p.add_argument("--work", type=Path, required=True, help="a schedule's work folder (holds <method>_s<seed>/)")
    p.add_argument("--method", default=None, help="default: the settings' prompts.method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set quantization.calibration_method=entropy")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    overrides = parse_sets(a.set)
    cfg = load_config(a.config, overrides)
    method = a.method or cfg.prompts.method
    teacher, head, _, _ = teacher_reference(cfg)
    runs = []
    for seed in a.seeds:
        run_dir = a.work / f"{method}_s{seed}"
        v = _variant(cfg, method, seed)
        per_class = synthesize_classes(v, method, seed, run_dir, teacher, head)
        student, resumed = distill_variant(v, teacher, head, per_class, run_dir)
        if not resumed:
            raise SystemExit(f"{run_dir}: no finished student there (this script trained one instead); point --work at a finished run")
        with tempfile.TemporaryDirectory() as tmp:
            w = load_config(a.config, deep_merge(overrides, {"workspace": tmp}))
            for c, images in zip(w.classes, per_class):
                artifacts.write_class_shard(w, c, images, [{} for _ in images], {})
            export_onnx(student, Path(tmp) / "fp32.onnx")
            comp = quantize_and_compare(w, Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", [artifacts.round_dir(w, c) for c in w.classes],
                                        student.input_size, student, teacher, head)
        r = {"seed": seed, **comp.record()}
        runs.append(r)
        print(f"seed {seed}: " + ", ".join(f"{d} fp32 {r['fp32_top1'][d]:.4f} int8 {r['int8_top1'][d]:.4f} (int8 - fp32 {-100 * r['top1_drop'][d]:+.2f} pt)"
                                         for d in r["fp32_top1"]) + f"; size {r['size_ratio']:.1%}; passed {r['passed']}"
              + (f"; QAT fp32 mean top-1 {np.mean(list(r['qat']['fp32_top1'].values())):.4f}" if r["qat"] else ""), flush=True)
    worst = max(max(r["top1_drop"].values()) for r in runs)
    mean_drop = float(np.mean([np.mean(list(r["top1_drop"].values())) for r in runs]))
    out = {"config": str(a.config), "set": a.set, "work": str(a.work), "method": method, "runs": runs, "worst_domain_drop": worst, "mean_drop": mean_drop,
           "all_passed": all(r["passed"] for r in runs)}
    print(f"worst domain drop over seeds {100 * worst:+.2f} points, mean {100 * mean_drop:+.2f}; every seed within tolerance: {out['all_passed']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
