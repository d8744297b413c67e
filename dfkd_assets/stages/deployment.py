"""Edge deployment: the champion's ONNX export quantized to int8 on synthetic images only, and its
top-1 per domain against the fp32 export on the evaluation sets (core/quantize.py). The asset
`champion_int8` calls `quantize_and_compare`; its blocking check is `Int8Comparison.passed`.

With `quantization.qat_epochs` > 0, a copy of the champion is first fine-tuned quantization-aware
(core/qat.py) on the same synthetic shards with the teacher's soft labels; its fp32 export is what
gets quantized, by the same calibration and settings. The int8 model is still compared with the
original champion's fp32 export: what would be deployed without int8.
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
    qat: dict | None = None  # the quantization-aware fine-tune (settings, last epoch, the fine-tuned fp32's top-1); None: PTQ only

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    def qat_tags(self) -> dict:
        """Whether and how it was fine-tuned quantization-aware, for the version's tags and the asset's metadata."""
        return {"qat_epochs": 0} if self.qat is None else {"qat_epochs": self.qat["epochs"], "qat_lr": self.qat["lr"]}

    def record(self) -> dict:
        return {"fp32_top1": self.fp32_top1, "int8_top1": self.int8_top1, "top1_drop": self.drops, "images": self.counts,
                "max_top1_drop": self.max_top1_drop, "passed": self.passed, "calibration_images": self.calibration_images,
                "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes, "size_ratio": self.size_ratio, "qat": self.qat}


def quantize_and_compare(cfg: DfkdConfig, fp32_onnx: Path, out: Path, shard_dirs: list[Path], input_size: int,
                         student=None, teacher=None, head=None) -> Int8Comparison:
    """`fp32_onnx` (the export of `student`) quantized into `out`, calibrated on the images of
    `shard_dirs` (synthetic shards: artifacts.snapshot_shard_dirs) with `quantization.*`, then both
    models' top-1 on every evaluation set (each image loaded once at the graph's input side, for both).

    With `quantization.qat_epochs` > 0 the quantized graph is the export of `student` fine-tuned
    quantization-aware (`quantization_aware_student`; `student`, `teacher` and its zero-shot `head`
    needed), and the fine-tuned fp32's top-1 is recorded beside (`qat`), never compared."""
    import tempfile

    import torch

    from dfkd_assets.core.export import export_onnx, onnx_predictor
    from dfkd_assets.core.quantize import SyntheticCalibration, quantize_int8, top1_drops, within_tolerance
    from dfkd_assets.loaders import eval_sets, quantization_settings
    from dfkd_assets.stages.evaluation import evaluate_models

    s = quantization_settings(cfg)
    calibration = SyntheticCalibration(shard_dirs, s.calibration_images, input_size)
    predictors, qat = {"fp32": onnx_predictor(fp32_onnx)}, None
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(fp32_onnx)
        if s.qat_epochs > 0:
            if student is None or teacher is None or head is None:
                raise ValueError(f"quantization.qat_epochs is {s.qat_epochs}: the fine-tune needs the fp32 student, the teacher and its "
                                 "zero-shot head")
            tuned, history, images = quantization_aware_student(cfg, student, teacher, head, shard_dirs, calibration)
            source = Path(tmp) / "qat.fp32.onnx"
            export_onnx(tuned, source)
            predictors["qat_fp32"] = onnx_predictor(source)
            qat = {"epochs": s.qat_epochs, "lr": s.qat_lr, "images": images, "last_epoch": history[-1]}
        quantize_int8(source, out, calibration, s)
        predictors["int8"] = onnx_predictor(out)
        ev = evaluate_models(cfg, predictors, eval_sets(cfg), torch.device("cpu"), input_size)
    if qat is not None:
        qat["fp32_top1"] = ev.top1["qat_fp32"]
    drops = top1_drops(ev.top1["fp32"], ev.top1["int8"])
    return Int8Comparison(ev.top1["fp32"], ev.top1["int8"], drops, ev.counts, s.max_top1_drop, within_tolerance(drops, s.max_top1_drop),
                          calibration.images_read, Path(fp32_onnx).stat().st_size, Path(out).stat().st_size, qat)


def quantization_aware_student(cfg: DfkdConfig, student, teacher, head, shard_dirs: list[Path], calibration):
    """(fp32 copy of `student` fine-tuned quantization-aware, per-epoch history, images trained on): `quantization.qat_epochs`
    epochs at `quantization.qat_lr` of distillation's KD (its augmentation, temperature, batch size,
    seed) on every image of `shard_dirs`, with the int8 rounding of `quantization.activations` simulated
    and the activation ranges observed on `calibration`'s images (core/qat.py). On the teacher's device."""
    import torch

    from dfkd_assets.core.qat import qat_distill_settings, qat_finetune
    from dfkd_assets.core.quantize import synthetic_images
    from dfkd_assets.loaders import distill_settings, quantization_settings

    s = quantization_settings(cfg)
    d = qat_distill_settings(distill_settings(cfg, head.device), s.qat_epochs, s.qat_lr)
    images = torch.from_numpy(synthetic_images(shard_dirs))
    tuned, history = qat_finetune(student, teacher, head, images, d, s.activations, calibration.batches())
    return tuned, history, len(images)


def int8_card(name: str, version: str, onnx_uri: str, c: Int8Comparison, calibration_dvc_hash: str, settings: dict) -> str:
    """The int8 version's model card (its registry description): where it came from, how it was
    calibrated (and whether it was fine-tuned quantization-aware first), file sizes and top-1 per domain
    of fp32 and int8."""
    rows = [f"| {d} | {c.counts[d]} | {c.fp32_top1[d]:.3f} | {c.int8_top1[d]:.3f} | {-100 * c.drops[d]:+.1f} |" for d in c.fp32_top1]
    return "\n".join([
        f"# {name}: int8 of v{version}", "",
        f"- quantized from `{onnx_uri}` (the fp32 ONNX export of `models:/{name}/{version}`) with ONNX Runtime, QDQ, int8 weights "
        f"({'per channel' if settings['per_channel'] else 'per tensor'}), {settings['activations']} activations, "
        f"{settings['calibration_method']} calibration",
        f"- calibrated on {c.calibration_images} synthetic images only (DVC `{calibration_dvc_hash}`, data/synthetic.dvc); no real image",
        _qat_line(c.qat),
        f"- file: {c.int8_bytes / 2**20:.2f} MiB int8 against {c.fp32_bytes / 2**20:.2f} MiB fp32 ({c.size_ratio:.1%})",
        "- input and output: as the student's pyfunc (float32 images [N, 3, H, W] in [0, 1], resized to the student's side; "
        "`label`, `score`, one probability per class)", "",
        f"## Top-1 per domain, fp32 ONNX and int8 (drop at most {100 * c.max_top1_drop:.1f} points on every domain: "
        f"{'passed' if c.passed else 'FAILED'})", "",
        "| domain | images | fp32 | int8 | int8 - fp32 (points) |", "|---|---|---|---|---|", *rows,
        f"| **mean** | {sum(c.counts.values())} | {_mean(c.fp32_top1):.3f} | {_mean(c.int8_top1):.3f} | {-100 * _mean(c.drops):+.1f} |",
    ])


def _qat_line(qat: dict | None) -> str:
    if qat is None:
        return "- post-training quantization only (quantization.qat_epochs 0: no quantization-aware fine-tuning)"
    return (f"- quantization-aware fine-tuning first (quantization.qat_epochs {qat['epochs']}, qat_lr {qat['lr']:g}): a copy of that export's "
            f"weights, BatchNorm folded, distilled from the teacher's soft labels on the {qat['images']} synthetic images with int8 "
            f"simulated, then quantized as above; int8 is compared with the original fp32 (the fine-tuned fp32: mean top-1 "
            f"{_mean(qat['fp32_top1']):.3f}, not deployed)")


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)
