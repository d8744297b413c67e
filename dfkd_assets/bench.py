"""Synthesis cost benchmark: `python -m dfkd_assets.bench` prints seconds per step and images/hour.

Random weights have the same cost as real ones, so this runs anywhere at paper settings
(ViT-B-32 teacher, f16 VQGAN, 224 px, cutn 32). The engine comparison against a reference loop,
MFU and distillation/latency numbers are issue #7; this is the baseline measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_synthesis(teacher_name: str, vqgan_config: Path, image_size: int, cutn: int, batch: int, iters: int, device_spec: str,
                    precision: str = "fp32") -> dict:
    import torch

    from dfkd_assets.core.devices import resolve_device, use_bf16
    from dfkd_assets.core.synthesis import SynthesisSettings, synthesize_batch
    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    device = resolve_device(device_spec)
    cfg_file = ROOT / "configs" / "models" / f"{teacher_name}.json"
    t0 = time.perf_counter()
    teacher = load_teacher(teacher_name, None, cfg_file if cfg_file.is_file() else None, 0, device)
    vqgan = load_vqgan(vqgan_config, None, 0, device)
    load_s = time.perf_counter() - t0
    targets = teacher.encode_text([f"a photo of a thing {i}" for i in range(batch)])
    bf16 = use_bf16(device, precision)
    settings = SynthesisSettings(iterations=2, cutn=cutn, image_size=image_size, bf16=bf16)
    synthesize_batch(vqgan, teacher, targets, list(range(batch)), settings)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = synthesize_batch(vqgan, teacher, targets, list(range(batch)), SynthesisSettings(iterations=iters, cutn=cutn, image_size=image_size, bf16=bf16))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    step_s = dt / iters
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "teacher": teacher_name, "vqgan": Path(vqgan_config).name, "image_size": image_size, "cutn": cutn, "batch": batch,
        "precision": "bf16" if bf16 else "fp32", "mean_final_cosine": float(res.cosines.mean()),
        "iters": iters, "seconds_per_step": step_s, "images_per_hour_at_400_steps": 3600 * batch / (400 * step_s),
        "model_load_seconds": load_s,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dfkd-bench", description=__doc__)
    p.add_argument("--teacher", default="ViT-B-32")
    p.add_argument("--vqgan-config", type=Path, default=ROOT / "configs" / "models" / "vqgan_imagenet_f16_16384.yaml")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cutn", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "auto"])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    results = [bench_synthesis(a.teacher, a.vqgan_config, a.image_size, a.cutn, b, a.iters, a.device, prec)
               for prec in a.precision for b in a.batch]
    print(f"{'batch':>5} {'prec':>5} {'s/step':>8} {'img/h@400':>10} {'cos':>6} {'load s':>7} {'GiB':>6}  device")
    for r in results:
        mem = f"{r['peak_gpu_mem_gib']:.1f}" if r["peak_gpu_mem_gib"] is not None else "-"
        print(f"{r['batch']:>5} {r['precision']:>5} {r['seconds_per_step']:>8.4f} {r['images_per_hour_at_400_steps']:>10.0f} "
              f"{r['mean_final_cosine']:>6.3f} {r['model_load_seconds']:>7.2f} {mem:>6}  {r['device']}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
