"""Asset `few_shot_report` (only when `fewshot.enabled`): the paper's Fig. 5 for this student.

The distilled student, the same architecture from scratch and (with local weights) from
ImageNet are fine-tuned on k labelled images per class of each evaluation domain and tested on
the rest of that domain. Curves, table and raw rows go to data/reports/fewshot* and into the
challenger's MLflow run.
"""

import json

import dagster as dg

from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.placement import GPU_OP_TAGS

from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings
from dfkd_assets.loaders import device_lease, eval_sets, fewshot_settings


@dg.asset(
    group_name="training",
    deps=["student_model"],
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="Few-shot fine-tuning curves (accuracy vs shots per domain): distilled student vs scratch (vs ImageNet).",
)
@no_retry_for_bad_input
def few_shot_report(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    import numpy as np

    from dfkd_assets.core.evaluation import load_image
    from dfkd_assets.core.fewshot import copy_of, few_shot_curves, load_backbone_weights, summarize
    from dfkd_assets.core.io import atomic_write_json, atomic_write_text
    from dfkd_assets.core.report import markdown_table, write_fewshot_png
    from dfkd_assets.core.student import build_student, load_student
    from dfkd_assets.core.weights import read_state_dict

    cfg = settings.load()
    fs = cfg.fewshot
    student_dir = cfg.path("student")
    registry = json.loads((student_dir / "registry.json").read_text())
    student = load_student(student_dir)
    arch, size = cfg.student.arch, cfg.student.input_size

    def scratch():
        return build_student(arch, cfg.classes, size, cfg.student.init_seed)

    starts = {"distilled": copy_of(student), "scratch": scratch}
    if fs.imagenet_weights is not None:
        if not fs.imagenet_weights.is_file():
            raise FileNotFoundError(f"fewshot.imagenet_weights {fs.imagenet_weights} not found")
        imagenet = read_state_dict(fs.imagenet_weights)
        starts["imagenet"] = lambda: load_backbone_weights(scratch(), imagenet, str(fs.imagenet_weights))
    domains = {
        f"{name}/{ds.domain}": (np.stack([load_image(p, size) for p in ds.paths]), np.asarray(ds.labels))
        for name, sets in eval_sets(cfg).items() for ds in sets
    }
    with device_lease(cfg) as device:
        rows = few_shot_curves(starts, domains, len(cfg.classes), fewshot_settings(cfg), device, context.log.info)
    summary = summarize(rows)
    out = cfg.path("reports")
    table_rows = [
        {"start": s, "domain": d, "shots": k, "top1 (mean ± std)": f"{m:.3f} ± {e:.3f}"} for (s, d, k), (m, e) in summary.items()
    ]
    table = markdown_table(table_rows, ["start", "domain", "shots", "top1 (mean ± std)"])
    atomic_write_json(out / "fewshot.json", {"rows": rows, "shots": fs.shots, "seeds": fs.seeds, "steps": fs.steps,
                                             "student_version": registry["version"]})
    write_fewshot_png(out / "fewshot.png", summary, f"few-shot fine-tuning, student v{registry['version']}")
    atomic_write_text(out / "fewshot.md", f"# Few-shot fine-tuning (student v{registry['version']})\n\n{table}\n\n![curves](fewshot.png)\n")
    client = mlflow_tracking.client(cfg)
    for start in starts:
        for k in fs.shots:
            vals = [m for (s, _, kk), (m, _) in summary.items() if s == start and kk == k]
            client.log_metric(registry["run_id"], f"fewshot_{start}_k{k}_mean_top1", float(np.mean(vals)))
    for name in ("fewshot.json", "fewshot.png", "fewshot.md"):
        client.log_artifact(registry["run_id"], str(out / name), "fewshot")
    gain = {k: float(np.mean([m for (s, _, kk), (m, _) in summary.items() if s == "distilled" and kk == k])
                      - np.mean([m for (s, _, kk), (m, _) in summary.items() if s == "scratch" and kk == k])) for k in fs.shots}
    return dg.MaterializeResult(
        metadata={
            "student_version": registry["version"],
            **{f"distilled_minus_scratch_k{k}": v for k, v in gain.items()},
            "table": dg.MetadataValue.md(table),
            "curves": dg.MetadataValue.md(md_image(out / "fewshot.png", "few-shot curves")),
            **lineage(cfg, context),
        }
    )
