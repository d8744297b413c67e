"""Asset `champion_onnx`: the current champion exported to ONNX, with a blocking parity check, and
registered as a version of `<name>-onnx` that names the champion version it came from
(defs/registry.py). An export that fails the parity check is written but not registered.

Asset `champion_int8` (only when `quantization.enabled`; stage: stages/deployment.py): that export
quantized to int8, calibrated on the synthetic shards of the current snapshot only, with a blocking
check that no evaluation domain loses more than `quantization.max_top1_drop` top-1 against the fp32
export; registered as a version of `<name>-onnx-int8` (the pyfunc code model with ONNX Runtime as
its network) only when the check passes. A failing int8 model is written but not registered.
With `quantization.qat_epochs` > 0 the champion is first fine-tuned quantization-aware on the same
synthetic shards (teacher's soft labels, on the CPU); int8 is still compared with the original fp32.
"""

import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.registry import ModelRegistry
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings

PARITY_TOLERANCE = 1e-4


@dg.asset(
    group_name="deployment",
    deps=["champion_student"],
    kinds={"onnx", "mlflow"},
    check_specs=[dg.AssetCheckSpec("onnx_matches_pytorch", asset="champion_onnx", blocking=True,
                                   description=f"ONNX Runtime and PyTorch logits agree within {PARITY_TOLERANCE}")],
    description="models:/<name>@champion as ONNX (dynamic batch, fixed input side) + ONNX Runtime parity with PyTorch; registered as <name>-onnx.",
)
@no_retry_for_bad_input
def champion_onnx(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.export import export_onnx, onnx_parity
    from dfkd_assets.core.io import atomic_write_json

    cfg = settings.load()
    registry = ModelRegistry(cfg, mlflow_tracking)
    version = registry.champion()
    if version is None:
        raise dg.Failure(f"model {registry.name} has no champion to export", allow_retries=False)
    model = registry.load(version)  # verified, pickle-free (registry.load_student_model)
    path = artifacts.onnx_export(cfg)
    export_onnx(model, path)
    diff = onnx_parity(model, path)
    passed = diff <= PARITY_TOLERANCE
    onnx_version = registry.register_onnx(version, path, model.input_size, model.classes, diff) if passed else None
    info = {"model_name": registry.name, "version": version, "classes": list(model.classes), "input": [None, 3, model.input_size, model.input_size],
            "max_abs_diff_vs_pytorch": diff, "onnx_model_uri": f"models:/{registry.onnx_name}/{onnx_version}" if onnx_version else None}
    atomic_write_json(artifacts.onnx_record(cfg), info)
    context.log.info(f"champion v{version} exported to ONNX; max |ONNX - PyTorch| = {diff:.2e}; "
                     + (f"registered as {info['onnx_model_uri']}" if passed else "not registered (parity check failed)"))
    return dg.MaterializeResult(
        metadata={"champion_version": version, "max_abs_diff_vs_pytorch": diff, "onnx_model_uri": str(info["onnx_model_uri"]),
                  "path": dg.MetadataValue.path(str(path.resolve())), "classes": dg.MetadataValue.json(info["classes"]),
                  **lineage(cfg, context)},
        check_results=[dg.AssetCheckResult(check_name="onnx_matches_pytorch", passed=passed,
                                           severity=dg.AssetCheckSeverity.ERROR, metadata={"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE})],
    )


INT8_CHECK = "int8_accuracy_within_tolerance"


@dg.asset(
    group_name="deployment",
    deps=["champion_onnx"],
    kinds={"onnx", "mlflow"},
    check_specs=[dg.AssetCheckSpec(INT8_CHECK, asset="champion_int8", blocking=True,
                                   description="int8 top-1 is at most quantization.max_top1_drop below fp32 on every evaluation domain")],
    description="The champion's ONNX export quantized to int8 (ONNX Runtime, QDQ, per-channel), calibrated on synthetic images only; "
    "fp32 and int8 top-1 per domain; registered as <name>-onnx-int8 when no domain drops more than quantization.max_top1_drop.",
)
@no_retry_for_bad_input
def champion_int8(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.io import atomic_write_json
    from dfkd_assets.defs.registry import CALIBRATION_DVC_HASH
    from dfkd_assets.stages.deployment import int8_card, quantize_and_compare

    cfg = settings.load()
    registry = ModelRegistry(cfg, mlflow_tracking)
    record = artifacts.read_onnx_record(cfg)
    version, champion = record["version"], registry.champion()
    if version != champion or not record.get("onnx_model_uri"):
        raise dg.Failure(f"{artifacts.onnx_export(cfg)} is the export of v{version} ({record.get('onnx_model_uri') or 'not registered: parity failed'}), "
                         f"the champion is v{champion}: materialize champion_onnx first", allow_retries=False)
    onnx_version = record["onnx_model_uri"].rsplit("/", 1)[1]
    dvc_hash, rounds = artifacts.read_snapshot_hash(cfg), artifacts.read_snapshot_index(cfg)["rounds"]
    shard_dirs = artifacts.snapshot_shard_dirs(cfg, rounds)
    model = registry.load(version)  # verified; its spec (classes, input side) goes with the int8 graph
    out = artifacts.int8_export(cfg)
    c = quantize_and_compare(cfg, artifacts.onnx_export(cfg), out, shard_dirs, model.input_size, model, *_qat_teacher(cfg))
    q = cfg.quantization.model_dump()
    card = int8_card(registry.name, version, record["onnx_model_uri"], c, dvc_hash, q)
    tags = lineage(cfg, context, **{CALIBRATION_DVC_HASH: dvc_hash, "calibration_images": c.calibration_images,
                                   "calibration_rounds": ",".join(map(str, rounds)), "worst_top1_drop": f"{max(c.drops.values()):.4f}",
                                   **c.qat_tags()})
    int8_version = registry.register_int8(version, onnx_version, out, model.spec(), tags, card) if c.passed else None
    uri = f"models:/{registry.int8_name}/{int8_version}" if int8_version else None
    atomic_write_json(out.with_suffix(".json"), {"model_name": registry.name, "version": version, "onnx_model_uri": record["onnx_model_uri"],
                                                 "int8_model_uri": uri, "calibration_dvc_hash": dvc_hash, "quantization": q, **c.record()})
    context.log.info(f"champion v{version} in int8: {c.int8_bytes / 2**20:.2f} MiB ({c.size_ratio:.1%} of fp32), worst top-1 drop "
                     f"{100 * max(c.drops.values()):+.1f} points; " + (f"registered as {uri}" if uri else "not registered (accuracy check failed)"))
    return dg.MaterializeResult(
        metadata={"champion_version": version, "int8_model_uri": str(uri), "calibration_dvc_hash": dvc_hash, "calibration_images": c.calibration_images,
                  **c.qat_tags(), "qat": dg.MetadataValue.json(c.qat or {}),
                  "fp32_bytes": c.fp32_bytes, "int8_bytes": c.int8_bytes, "size_ratio": c.size_ratio,
                  "model_card": dg.MetadataValue.md(card), "path": dg.MetadataValue.path(str(out.resolve())), **lineage(cfg, context)},
        check_results=[dg.AssetCheckResult(check_name=INT8_CHECK, passed=c.passed, severity=dg.AssetCheckSeverity.ERROR,
                                           metadata={"max_top1_drop": c.max_top1_drop, "worst_drop": max(c.drops.values()),
                                                     "top1_drop": dg.MetadataValue.json(c.drops), "fp32_top1": dg.MetadataValue.json(c.fp32_top1),
                                                     "int8_top1": dg.MetadataValue.json(c.int8_top1)})],
    )


def _qat_teacher(cfg) -> tuple:
    """(teacher, the zero-shot head the champion was distilled against: the teacher_head asset) on the
    CPU for the quantization-aware fine-tune's KD targets; (None, None), loading nothing, when
    quantization.qat_epochs is 0."""
    import torch

    from dfkd_assets.loaders import teacher_for

    if cfg.quantization.qat_epochs == 0:
        return None, None
    cpu = torch.device("cpu")  # int8 targets the CPU, and champion_int8 holds no GPU
    teacher = teacher_for(cfg, cpu)
    return teacher, artifacts.read_teacher_head(cfg, teacher, cpu)
