"""Asset `champion_onnx`: the current champion exported to ONNX, with a blocking parity check, and
registered as a version of `<name>-onnx` that names the champion version it came from
(defs/registry.py). An export that fails the parity check is written but not registered.
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
    out = artifacts.export_dir(cfg)
    export_onnx(model, out / "champion.onnx")
    diff = onnx_parity(model, out / "champion.onnx")
    passed = diff <= PARITY_TOLERANCE
    onnx_version = registry.register_onnx(version, out / "champion.onnx", model.input_size, model.classes, diff) if passed else None
    info = {"model_name": registry.name, "version": version, "classes": list(model.classes), "input": [None, 3, model.input_size, model.input_size],
            "max_abs_diff_vs_pytorch": diff, "onnx_model_uri": f"models:/{registry.onnx_name}/{onnx_version}" if onnx_version else None}
    atomic_write_json(out / "champion.json", info)
    context.log.info(f"champion v{version} exported to ONNX; max |ONNX - PyTorch| = {diff:.2e}; "
                     + (f"registered as {info['onnx_model_uri']}" if passed else "not registered (parity check failed)"))
    return dg.MaterializeResult(
        metadata={"champion_version": version, "max_abs_diff_vs_pytorch": diff, "onnx_model_uri": str(info["onnx_model_uri"]),
                  "path": dg.MetadataValue.path(str((out / "champion.onnx").resolve())), "classes": dg.MetadataValue.json(info["classes"]),
                  **lineage(cfg, context)},
        check_results=[dg.AssetCheckResult(check_name="onnx_matches_pytorch", passed=passed,
                                           severity=dg.AssetCheckSeverity.ERROR, metadata={"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE})],
    )
