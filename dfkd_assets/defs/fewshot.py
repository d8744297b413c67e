"""Asset `few_shot_report` (only when `fewshot.enabled`): the paper's Fig. 5 for this student.

The distilled student, the same architecture from scratch and (with local weights) from
ImageNet are fine-tuned on k labelled images per class of each evaluation domain and tested on
the rest of that domain. Curves, table and raw rows go to data/reports/fewshot* and into the
challenger's MLflow run.
"""

import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.defs.placement import gpu_asset
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings
from dfkd_assets.loaders import device_lease


@gpu_asset(
    group_name="training",
    deps=["student_model"],
    kinds={"pytorch", "mlflow"},
    description="Few-shot fine-tuning curves (accuracy vs shots per domain): distilled student vs scratch (vs ImageNet).",
)
def few_shot_report(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.io import atomic_write_json, atomic_write_text
    from dfkd_assets.core.report import write_fewshot_png
    from dfkd_assets.stages.fewshot import few_shot, few_shot_summary

    cfg = settings.load()
    fs = cfg.fewshot
    record = artifacts.read_student_record(cfg)
    with device_lease(cfg) as device:
        rows = few_shot(cfg, artifacts.read_student(cfg), device, context.log.info)
    summary, table, gain, per_k = few_shot_summary(rows, fs.shots)
    files = artifacts.fewshot_files(cfg)
    atomic_write_json(files["json"], {"rows": rows, "shots": fs.shots, "seeds": fs.seeds, "steps": fs.steps, "student_version": record.version})
    write_fewshot_png(files["png"], summary, f"few-shot fine-tuning, student v{record.version}")
    atomic_write_text(files["md"], f"# Few-shot fine-tuning (student v{record.version})\n\n{table}\n\n![curves](fewshot.png)\n")
    mlflow_tracking.log_to_run(cfg, record.run_id, {f"fewshot_{start}_k{k}_mean_top1": v for (start, k), v in per_k.items()},
                               list(files.values()), "fewshot")
    return dg.MaterializeResult(
        metadata={
            "student_version": record.version,
            **{f"distilled_minus_scratch_k{k}": v for k, v in gain.items()},
            "table": dg.MetadataValue.md(table),
            "curves": dg.MetadataValue.md(md_image(files["png"], "few-shot curves")),
            **lineage(cfg, context),
        }
    )
