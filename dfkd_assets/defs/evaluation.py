"""Asset `evaluation_report`: top-1 per domain of the challenger, the teacher and the current champion.

All three are scored on the same images in one pass, so the promotion rule compares like with
like. Writes data/reports/ (metrics.json for `dvc metrics`, per_domain.csv for `dvc plots`,
report.md, confusion PNGs) and logs them into the challenger's MLflow run.
"""


import json
import math

import dagster as dg

from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.placement import GPU_OP_TAGS

from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.loaders import device_lease, eval_sets, head_for, teacher_for
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings


def _json_safe(obj):
    """NaN/inf -> null, so metrics.json stays valid JSON for DVC and other readers."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dg.asset(
    group_name="training",
    deps=["student_model"],
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="Per-domain top-1 of student (challenger), teacher and champion; markdown report + confusion matrices.",
)
@no_retry_for_bad_input
def evaluation_report(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    import numpy as np

    from dfkd_assets.core.evaluation import EvalDataError, evaluate, transfer_ratio
    from dfkd_assets.core.io import atomic_write_json, atomic_write_text
    from dfkd_assets.core.report import markdown_table, write_confusion_png
    from dfkd_assets.core.student import load_student
    from dfkd_assets.core.teacher import teacher_logits

    cfg = settings.load()
    if not cfg.evaluation.datasets:
        raise EvalDataError("evaluation.datasets is empty: add at least one DomainBed-style folder to evaluate on")
    with device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = head_for(cfg, teacher, device)
        student_dir = cfg.path("student")
        registry = json.loads((student_dir / "registry.json").read_text())
        student = load_student(student_dir).to(device)
        predictors = {"student": student, "teacher": lambda x: teacher_logits(teacher, head, x)}
        champion_version = mlflow_tracking.alias_version(cfg, "champion")
        if champion_version is not None and champion_version != registry["version"]:
            import mlflow.pytorch

            mlflow_tracking.client(cfg)  # sets the tracking/registry URIs
            champ = mlflow.pytorch.load_model(f"models:/{cfg.mlflow.registered_model_name}@champion", map_location=device).eval()
            if list(getattr(champ, "classes", [])) != cfg.classes:
                context.log.warning(f"champion v{champion_version} was trained for classes {getattr(champ, 'classes', '?')}; not compared")
            else:
                predictors["champion"] = champ

        size = max(student.input_size, teacher.image_size)
        results = {m: {} for m in predictors}
        counts = {}
        for name, sets in eval_sets(cfg).items():
            res = evaluate(predictors, sets, len(cfg.classes), size, cfg.evaluation.batch_size, device, prefix=f"{name}/")
            for m, r in res.items():
                results[m][name] = r
                counts.update(r.counts)

        domains = list(counts)
        top1 = {m: {d: v for r in results[m].values() for d, v in r.top1.items()} for m in predictors}
        mean = {m: float(np.mean([top1[m][d] for d in domains])) for m in predictors}
        chance = 1.0 / len(cfg.classes)
        ratio = {d: transfer_ratio(top1["student"][d], top1["teacher"][d], chance) for d in domains}
        mean_ratio = float(np.nanmean(list(ratio.values()))) if any(np.isfinite(list(ratio.values()))) else float("nan")
        out = cfg.path("reports")
        metrics = {
            "challenger_version": registry["version"],
            "champion_version": champion_version if "champion" in predictors else None,  # the champion compared against
            "champion_seen": champion_version,  # the alias at evaluation time, compared or not (other classes)
            "chance": chance,
            **{f"{m}_mean_top1": mean[m] for m in predictors},
            "mean_transfer_ratio": mean_ratio,
            "per_domain": {d: {m: top1[m][d] for m in predictors} | {"images": counts[d], "transfer_ratio": ratio[d]} for d in domains},
        }
        atomic_write_json(out / "metrics.json", _json_safe(metrics))
        csv = "domain," + ",".join(predictors) + ",transfer_ratio\n" + "".join(
            f"{d}," + ",".join(f"{top1[m][d]:.6f}" for m in predictors) + f",{ratio[d]:.6f}\n" for d in domains
        )
        atomic_write_text(out / "per_domain.csv", csv)
        rows = [{"domain": d, "images": counts[d], **{m: top1[m][d] for m in predictors}, "chance": chance, "transfer": ratio[d]} for d in domains]
        rows.append({"domain": "**mean**", "images": sum(counts.values()), **mean, "chance": chance, "transfer": mean_ratio})
        table = markdown_table(rows, ["domain", "images", *predictors, "chance", "transfer"])
        conf_md = []
        for ds_name, r in results["student"].items():
            for d, cm in r.confusion.items():
                png = out / f"confusion_{d.replace('/', '_')}.png"
                write_confusion_png(png, cm, cfg.classes, f"student v{registry['version']} on {d}")
                conf_md.append(f"![{d}]({png.name})")
        report = (
            f"# Evaluation of student v{registry['version']} ({cfg.mlflow.registered_model_name})\n\n"
            f"Top-1 accuracy per domain; chance = {chance:.3f}; transfer = (student - chance) / (teacher - chance), "
            f"the share of the teacher's above-chance accuracy the student inherited. Teacher: `{teacher.teacher_id}`. "
            f"Data: DVC `{registry['dvc_hash']}`.\n\n{table}\n\n## Confusion matrices (student)\n\n" + "\n".join(conf_md) + "\n"
        )
        atomic_write_text(out / "report.md", report)
        client = mlflow_tracking.client(cfg)
        for m in predictors:
            client.log_metric(registry["run_id"], f"eval_{m}_mean_top1", mean[m])
            for d in domains:
                client.log_metric(registry["run_id"], f"eval_{m}_top1.{d.replace('/', '.')}", top1[m][d])
        if np.isfinite(mean_ratio):
            client.log_metric(registry["run_id"], "eval_mean_transfer_ratio", mean_ratio)
        client.log_artifacts(registry["run_id"], str(out), "evaluation")
        # last: marks the version as evaluated, the only kind promotion and rollback accept (an
        # outage before this line leaves the version unevaluated, never half-evaluated)
        if cfg.promotion.metric in metrics:
            client.set_model_version_tag(registry["model_name"], registry["version"], f"evaluated_{cfg.promotion.metric}", str(metrics[cfg.promotion.metric]))
        context.log.info("\n" + table)
        first_png = out / f"confusion_{domains[0].replace('/', '_')}.png"
        return dg.MaterializeResult(
            metadata={
                "challenger_version": registry["version"],
                "champion_version": str(metrics["champion_version"]),
                **{f"{m}_mean_top1": mean[m] for m in predictors},
                "chance": chance,
                "mean_transfer_ratio": mean_ratio,
                "per_domain": dg.MetadataValue.md(table),
                "report": dg.MetadataValue.path(str((out / "report.md").resolve())),
                "confusion": dg.MetadataValue.md(md_image(first_png, domains[0])),
                "mlflow_run_id": registry["run_id"],
                **lineage(cfg, context),
            }
        )
