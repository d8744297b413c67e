"""Asset `evaluation_report`: top-1 per domain of the challenger, the teacher and the current champion
(stage: dfkd_assets/stages/evaluation.py).

All three are scored on the same images in one pass, so the promotion rule compares like with
like. Writes data/reports/ (metrics.json for `dvc metrics`, per_domain.csv for `dvc plots`,
report.md, confusion PNGs), logs them into the challenger's MLflow run, writes the per-domain
table into the version's model card and, last, marks the version evaluated in the registry.

The round curve: every evaluation adds the student's top-1 per domain at its training set's
images per class to the metric histories of one MLflow run per registered model
(`round-curve-<name>`, step = images per class), and attaches the plot of those histories:
what each retraining round bought.
"""


import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.core.names import metric_key
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.defs.placement import gpu_asset
from dfkd_assets.defs.registry import ModelRegistry
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings
from dfkd_assets.loaders import device_lease, eval_sets, teacher_for


@gpu_asset(
    group_name="training",
    deps=["student_model", "student_head"],  # whichever of them wrote data/student last
    kinds={"pytorch", "mlflow"},
    description="Per-domain top-1 of student (challenger), teacher and champion; markdown report + confusion matrices.",
)
def evaluation_report(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.evaluation import EvalDataError
    from dfkd_assets.core.io import exclusive_lock
    from dfkd_assets.stages.evaluation import per_domain_csv, per_domain_table, report_markdown

    cfg = settings.load()
    if not cfg.evaluation.datasets:
        raise EvalDataError("evaluation.datasets is empty: add at least one DomainBed-style folder to evaluate on")
    registry = ModelRegistry(cfg, mlflow_tracking)
    # the student's files may not change while they are scored, and are the recorded version's
    with exclusive_lock(artifacts.student_lock(cfg), on_wait=context.log.info), device_lease(cfg) as device:
        record = artifacts.read_student_record(cfg)
        registry.check_files(record.version, artifacts.student_dir(cfg))
        teacher = teacher_for(cfg, device)
        head = _teacher_head(cfg, teacher, device)
        ev, metrics = _score(cfg, registry, record.version, teacher, head, artifacts.read_student(cfg).to(device), device, context.log.warning)
        pngs = _write_confusions(cfg, ev, record.version)
        report = report_markdown(ev, f"Evaluation of student v{record.version} ({record.model_name})", teacher.teacher_id, record.dvc_hash, pngs,
                                 metrics["champion_version"])
        out = artifacts.write_evaluation(cfg, metrics, per_domain_csv(ev), report)
        registry.log_evaluation(record.run_id, _run_metrics(ev), out)
        registry.write_card(record.version, per_domain_table(ev))
        # last: marks the version as evaluated, the only kind promotion and rollback accept (an
        # outage before this line leaves the version unevaluated, never half-evaluated)
        if cfg.promotion.metric in metrics:
            registry.mark_evaluated(record.version, metrics[cfg.promotion.metric])
        table = per_domain_table(ev)
        context.log.info("\n" + table)
        curve = _round_curve(cfg, mlflow_tracking, registry, record.version, ev)
        return dg.MaterializeResult(metadata={**_report_metadata(ev, metrics, table, out, pngs[0]), "mlflow_run_id": record.run_id, **curve,
                                              **lineage(cfg, context)})


def _score(cfg, registry: ModelRegistry, version: str, teacher, head, student, device, warn):
    """Student, teacher and (when comparable) champion on every evaluation set: (evaluation, metrics record)."""
    from dfkd_assets.core.teacher import teacher_logits
    from dfkd_assets.stages.evaluation import champion_predictors, compare_on_shared, evaluate_models, metrics_record

    predictors = {"student": student, "teacher": lambda x: teacher_logits(teacher, head, x)}
    champion = registry.champion()
    compared = _comparable_champion(cfg, registry, champion, version, device, warn)
    if compared is not None:
        predictors.update(champion_predictors(cfg.classes, student, compared, compared.classes))
    ev = evaluate_models(cfg, predictors, eval_sets(cfg), device, max(student.input_size, teacher.image_size))
    if compared is not None:
        ev = compare_on_shared(ev, cfg.classes, compared.classes)
    return ev, metrics_record(ev, version, champion if compared is not None else None, champion)


def _round_curve(cfg, tracking: MlflowTracking, registry: ModelRegistry, version: str, ev) -> dict:
    """Adds this evaluation to the round curve (MLflow metric histories, step = images per class)
    and plots them into reports/round_curve.png: the metadata entries, none for a version without
    a recorded training-set size."""
    from dfkd_assets.core.report import write_round_curve_png

    images = registry.trained_images_per_class(version)
    if images is None:
        return {}
    run_id = tracking.curve_run_id(cfg, f"round-curve-{registry.name}")
    points = {"mean": ev.mean["student"], **{d: ev.top1["student"][d] for d in ev.domains}}
    series = {}
    for name, value in points.items():
        key = "round_curve_top1." + metric_key(name).replace("/", ".")
        tracking.log_series(cfg, run_id, key, [(images, value)])
        series[name] = tracking.metric_history(cfg, run_id, key)
    png = artifacts.round_curve_png(cfg)
    write_round_curve_png(png, series, f"{registry.name}: student top-1 per round")
    return {"round_curve": dg.MetadataValue.md(md_image(png, "student top-1 against images per class")),
            "round_curve_points": dg.MetadataValue.json(series), "train_images_per_class": images, "round_curve_run_id": run_id}


def _teacher_head(cfg, teacher, device):
    """The stored zero-shot head (teacher_head) when it was built for the settings' classes; otherwise
    (a run of `add_classes`, whose settings name classes added by name, on a workspace that may never
    have materialized teacher_head) the same head built now: text encodes only, and the teacher is
    scored on exactly the classes the challenger serves."""
    from dfkd_assets.stages.prompts import build_head

    try:
        return artifacts.read_teacher_head(cfg, teacher, device)
    except (FileNotFoundError, artifacts.TeacherHeadMismatch):
        return build_head(cfg, teacher).to(device)


def _comparable_champion(cfg, registry: ModelRegistry, champion: str | None, challenger: str, device, warn):
    """The champion model to compare the challenger with: one other than the challenger that serves the
    same classes, or at least 2 of them (then both are scored on the classes they share); else None.

    Fewer than 2 classes in common are not compared (on a single class, top-1 with the other classes
    masked is 1 for any model), and the challenger replaces that champion. A champion in the old pickle
    format is not loaded (nor compared) either: the challenger replaces it, which is how such a registry
    is re-registered."""
    from dfkd_assets.defs.registry import LegacyModelError
    from dfkd_assets.stages.evaluation import shared_classes

    if champion is None or champion == challenger:
        return None
    try:
        model = registry.load(champion, device)
    except LegacyModelError as e:
        warn(f"{e}; not compared")
        return None
    classes = list(getattr(model, "classes", []))
    if classes == cfg.classes:
        return model
    shared = shared_classes(cfg.classes, classes)
    if len(shared) < 2:
        warn(f"champion v{champion} was trained for classes {classes or '?'}, sharing {shared or 'none'} with {cfg.classes}: "
             "fewer than 2 classes in common, not compared (the challenger replaces it)")
        return None
    warn(f"champion v{champion} was trained for classes {classes}: compared on the {len(shared)} classes both serve ({', '.join(shared)})")
    return model


def _report_metadata(ev, metrics: dict, table: str, out, first_png: tuple[str, str]) -> dict:
    from dfkd_assets.stages.evaluation import shared_line

    shared = {"shared_comparison": shared_line(ev, metrics["champion_version"]),
              **{k: metrics[k] for k in ("student_shared_mean_top1", "champion_shared_mean_top1")}} if ev.shared_classes else {}
    return {
        "challenger_version": metrics["challenger_version"], "champion_version": str(metrics["champion_version"]), **shared,
        **{k: metrics[k] for k in (*(f"{m}_mean_top1" for m in ev.models), "chance", "mean_transfer_ratio")},
        "per_domain": dg.MetadataValue.md(table), "report": dg.MetadataValue.path(str((out / "report.md").resolve())),
        "confusion": dg.MetadataValue.md(md_image(out / first_png[1], first_png[0])),
    }


def _write_confusions(cfg, ev, version: str) -> list[tuple[str, str]]:
    """One PNG per domain of the student's confusion matrix; (domain, file name) in domain order."""
    from dfkd_assets.core.report import write_confusion_png

    out, pngs = artifacts.reports_dir(cfg), []
    for d, cm in ev.confusion["student"].items():
        name = f"confusion_{d.replace('/', '_')}.png"
        write_confusion_png(out / name, cm, cfg.classes, f"student v{version} on {d}")
        pngs.append((d, name))
    return pngs


def _run_metrics(ev) -> dict[str, float]:
    """The scores as MLflow metric keys of the challenger's run."""
    metrics = {f"eval_{m}_mean_top1": v for m, v in ev.mean.items()}
    for m in ev.models:
        metrics.update({f"eval_{m}_top1.{metric_key(d).replace('/', '.')}": ev.top1[m][d] for d in ev.domains})
    return {**metrics, "eval_mean_transfer_ratio": ev.mean_transfer()}
