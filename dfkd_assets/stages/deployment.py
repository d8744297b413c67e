"""Edge deployment: the champion's ONNX export quantized to int8 on synthetic images only, and its
top-1 per domain against the fp32 export on the evaluation sets (core/quantize.py). The asset
`champion_int8` calls `quantize_and_compare`; its blocking check is `Int8Comparison.passed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfkd_assets.config import DfkdConfig


@dataclass
class Int8Comparison:
    """fp32 and int8 top-1 per domain ('<dataset>/<domain>') on the same images, and what was compared."""

    fp32_top1: dict[str, float]
    int8_top1: dict[str, float]
    drops: dict[str, float]  # fp32 - int8 per domain
    counts: dict[str, int]  # images per domain
    max_top1_drop: float
    passed: bool  # every domain's drop <= max_top1_drop
    calibration_images: int  # synthetic images the ranges were calibrated on
    fp32_bytes: int
    int8_bytes: int

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    def record(self) -> dict:
        return {"fp32_top1": self.fp32_top1, "int8_top1": self.int8_top1, "top1_drop": self.drops, "images": self.counts,
                "max_top1_drop": self.max_top1_drop, "passed": self.passed, "calibration_images": self.calibration_images,
                "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes, "size_ratio": self.size_ratio}


def quantize_and_compare(cfg: DfkdConfig, fp32_onnx: Path, out: Path, shard_dirs: list[Path], input_size: int) -> Int8Comparison:
    """`fp32_onnx` quantized into `out`, calibrated on the images of `shard_dirs` (synthetic shards:
    artifacts.snapshot_shard_dirs) with `quantization.*`, then both models' top-1 on every evaluation
    set (each image loaded once at the graph's input side, for both)."""
    import torch

    from dfkd_assets.core.export import onnx_predictor
    from dfkd_assets.core.quantize import SyntheticCalibration, quantize_int8, top1_drops, within_tolerance
    from dfkd_assets.loaders import eval_sets, quantization_settings
    from dfkd_assets.stages.evaluation import evaluate_models

    s = quantization_settings(cfg)
    calibration = SyntheticCalibration(shard_dirs, s.calibration_images, input_size)
    quantize_int8(fp32_onnx, out, calibration, s)
    ev = evaluate_models(cfg, {"fp32": onnx_predictor(fp32_onnx), "int8": onnx_predictor(out)}, eval_sets(cfg), torch.device("cpu"), input_size)
    drops = top1_drops(ev.top1["fp32"], ev.top1["int8"])
    return Int8Comparison(ev.top1["fp32"], ev.top1["int8"], drops, ev.counts, s.max_top1_drop, within_tolerance(drops, s.max_top1_drop),
                          calibration.images_read, Path(fp32_onnx).stat().st_size, Path(out).stat().st_size)


def int8_card(name: str, version: str, onnx_uri: str, c: Int8Comparison, calibration_dvc_hash: str, settings: dict) -> str:
    """The int8 version's model card (its registry description): where it came from, how it was
    calibrated, file sizes and top-1 per domain of fp32 and int8."""
    rows = [f"| {d} | {c.counts[d]} | {c.fp32_top1[d]:.3f} | {c.int8_top1[d]:.3f} | {-100 * c.drops[d]:+.1f} |" for d in c.fp32_top1]
    return "\n".join([
        f"# {name}: int8 of v{version}", "",
        f"- quantized from `{onnx_uri}` (the fp32 ONNX export of `models:/{name}/{version}`) with ONNX Runtime, QDQ, int8 weights "
        f"({'per channel' if settings['per_channel'] else 'per tensor'}), {settings['activations']} activations, "
        f"{settings['calibration_method']} calibration",
        f"- calibrated on {c.calibration_images} synthetic images only (DVC `{calibration_dvc_hash}`, data/synthetic.dvc); no real image",
        f"- file: {c.int8_bytes / 2**20:.2f} MiB int8 against {c.fp32_bytes / 2**20:.2f} MiB fp32 ({c.size_ratio:.1%})",
        "- input and output: as the student's pyfunc (float32 images [N, 3, H, W] in [0, 1], resized to the student's side; "
        "`label`, `score`, one probability per class)", "",
        f"## Top-1 per domain, fp32 ONNX and int8 (drop at most {100 * c.max_top1_drop:.1f} points on every domain: "
        f"{'passed' if c.passed else 'FAILED'})", "",
        "| domain | images | fp32 | int8 | int8 - fp32 (points) |", "|---|---|---|---|---|", *rows,
        f"| **mean** | {sum(c.counts.values())} | {_mean(c.fp32_top1):.3f} | {_mean(c.int8_top1):.3f} | {-100 * _mean(c.drops):+.1f} |",
    ])


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)
