"""Assets `student_model`: knowledge distillation on the snapshot (stage: dfkd_assets/stages/training.py),
tracked in MLflow and registered as the new `challenger` (defs/registry.py: a pickle-free pyfunc,
dfkd_assets/registry_model.py); and `student_head`: a registered embedding student re-headed for
the settings' classes (classes added by name, job `add_classes`, `dfkd add-classes`).

student_model resumes from the per-epoch checkpoint when the fingerprint (settings, teacher, data hash) is
unchanged. Trains on the snapshot's union of rounds (index.json); the version's tags name the
rounds, the images per class and the DVC hash of that snapshot, so `dfkd rounds restore` gets its
training set back. With `operations.warm_start`, starts from the champion's weights. Both
assets write data/student/ and its record, which evaluation_report reads.
"""


import dagster as dg
from pydantic import Field

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.placement import gpu_asset
from dfkd_assets.defs.registry import PROMPT_METHOD, WARM_START_FROM, WEIGHTS_FROM, ModelRegistry, data_round_tags
from dfkd_assets.defs.resources import DvcRepo, MlflowTracking, PipelineSettings
from dfkd_assets.fingerprints import module_id
from dfkd_assets.loaders import device_lease, eval_sets, teacher_for
from dfkd_assets.redaction import redact


@gpu_asset(
    group_name="training",
    deps=["synthetic_dataset", "teacher_head"],
    kinds={"pytorch", "mlflow"},
    description="Student distilled from the teacher on the synthetic snapshot; new MLflow model version, alias `challenger`.",
)
def student_model(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking, dvc: DvcRepo) -> dg.MaterializeResult:
    from dfkd_assets.core.io import exclusive_lock
    from dfkd_assets.core.progress import Progress
    from dfkd_assets.stages.training import distill_student, kd_set, train_steps

    cfg = settings.load()
    registry = ModelRegistry(cfg, mlflow_tracking)
    # one training writes data/student/ (and its checkpoint) at a time; evaluation waits for it too
    with exclusive_lock(artifacts.student_lock(cfg), on_wait=context.log.info), device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = artifacts.read_teacher_head(cfg, teacher, device)
        dvc_hash, rounds = artifacts.read_snapshot_hash(cfg), artifacts.read_snapshot_index(cfg)["rounds"]
        per_class = [artifacts.read_class_images(cfg, c, rounds) for c in cfg.classes]
        artifacts.check_snapshot(cfg, dvc.snapshot_files(cfg, dvc_hash), rounds, dvc_hash)  # the dvc_hash tag names what was read
        init, init_tags = _warm_start(cfg, registry, context.log)
        init_id = f"{init_tags[WARM_START_FROM]}:{module_id(init)}" if init is not None else ""  # a warm start by its weights' bytes
        ks = kd_set(cfg, teacher.teacher_id, per_class, device, dvc_hash, init_id)
        fingerprint = ks.fingerprint
        tags = lineage(cfg, context, dvc_hash=dvc_hash, teacher_id=teacher.teacher_id, fingerprint=fingerprint, **{PROMPT_METHOD: cfg.prompts.method},
                       **data_round_tags(rounds, min(map(len, per_class))), **init_tags)
        with mlflow_tracking.run(cfg, run_name=f"student-{context.run.run_id[:8]}", tags=tags) as run:
            mlflow_tracking.log_settings(cfg)
            prog = Progress(train_steps(cfg, len(ks.labels)), "distillation", context.log.info, unit="steps")
            student, history = distill_student(
                cfg, teacher, head, ks.images, ks.labels, device, artifacts.student_work_dir(cfg), fingerprint,
                on_epoch=lambda rec: mlflow_tracking.log({k: v for k, v in rec.items() if k != "epoch"}, step=rec["epoch"]), on_step=prog.update,
                init_from=init,
            )
            prog.close()
            out = artifacts.write_student(cfg, student, history)
            artifacts.write_params(cfg)
            version = registry.register_challenger(student, tags)
        record = artifacts.StudentRecord(registry.name, version, run.info.run_id, dvc_hash, fingerprint)
        artifacts.write_student_record(cfg, record)
        last = history[-1]
        context.log.info(f"student v{version}: final KD loss {last['kd_loss']:.4f}, teacher agreement {last['teacher_agreement']:.3f}")
        return dg.MaterializeResult(metadata={**_student_metadata(cfg, registry, record, history, out), "num_train_images": len(ks.labels),
                                               "num_broad_images": ks.num_broad, **tags})


def _warm_start(cfg, registry: ModelRegistry, log) -> tuple[object | None, dict]:
    """(the champion's network, {warm_start_from: version}) when operations.warm_start is on and the
    champion fits the settings; (None, {}) otherwise (logged: the student starts from its init)."""
    from dfkd_assets.stages.training import warm_start_refusal

    champion = registry.champion() if cfg.operations.warm_start else None
    if champion is None:
        return None, {}
    model = registry.load(champion)
    refusal = warm_start_refusal(cfg, model)
    if refusal:
        log.warning(f"operations.warm_start: not starting from v{champion} ({refusal}); training from init")
        return None, {}
    log.info(f"operations.warm_start: starting from the weights of champion v{champion}")
    return model, {WARM_START_FROM: champion}


def _student_metadata(cfg, registry: ModelRegistry, record: artifacts.StudentRecord, history: list[dict], out) -> dict:
    last = history[-1]
    return {
        "model_version": record.version,
        "mlflow_run_id": record.run_id,
        "mlflow_tracking_uri": redact(registry.tracking.uri(cfg)),
        "model_uri": registry.model_uri(record.version),
        "path": dg.MetadataValue.path(str(out.resolve())),
        "final_kd_loss": last["kd_loss"],
        "final_teacher_agreement": last["teacher_agreement"],
        "epochs": len(history),
        "history": dg.MetadataValue.md(
            "| epoch | kd_loss | teacher_agreement |\n|---|---|---|\n"
            + "\n".join(f"| {h['epoch']} | {h['kd_loss']:.4f} | {h['teacher_agreement']:.3f} |" for h in history)
        ),
    }


class StudentHeadConfig(dg.Config):
    base_version: str = Field("", description="registered embedding student to re-head for the settings' classes: a version ('3') or "
                              "'champion'. Empty (Materialize all, the train job): nothing is re-headed, the student just distilled passes through")


@dg.asset(
    group_name="training",
    deps=["student_model"],  # orders it after a distillation in the same run (Materialize all), where it passes that student through
    kinds={"pytorch", "mlflow"},
    description="With `base_version` set (job `add_classes`, `dfkd add-classes`): a registered embedding student with the teacher's "
                "zero-shot head for the settings' classes, classes added by name in seconds, same weights; new MLflow model version, "
                "alias `challenger`. Without it: the student just distilled passes through unchanged.",
)
@no_retry_for_bad_input
def student_head(context: dg.AssetExecutionContext, config: StudentHeadConfig, settings: PipelineSettings,
                 mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    import torch

    from dfkd_assets.core.io import exclusive_lock
    from dfkd_assets.stages.training import student_for_classes

    cfg = settings.load()
    if not config.base_version.strip():
        context.log.info("no base_version: nothing re-headed; evaluation_report reads the student distilled by student_model")
        return dg.MaterializeResult(metadata={"reheaded": False})
    registry = ModelRegistry(cfg, mlflow_tracking)
    base_version = registry.version_or_champion("" if config.base_version.strip() == "champion" else config.base_version)
    student = student_for_classes(cfg, teacher_for(cfg, torch.device("cpu")), registry.load(base_version), f"{registry.name} v{base_version}")
    if cfg.evaluation.datasets:  # a version is promoted only once evaluated on every class: refuse before registering
        eval_sets(cfg)
    tags = lineage(cfg, context, **registry.reheaded_tags(base_version))
    with exclusive_lock(artifacts.student_lock(cfg), on_wait=context.log.info):
        with mlflow_tracking.run(cfg, run_name=f"student-head-{context.run.run_id[:8]}", tags=tags) as run:
            mlflow_tracking.log_settings(cfg)
            out = artifacts.write_student(cfg, student, [])
            version = registry.register_challenger(student, tags)
        artifacts.write_student_record(cfg, artifacts.StudentRecord(registry.name, version, run.info.run_id, tags.get("dvc_hash", ""),
                                                                    tags.get("fingerprint", "")))
    context.log.info(f"student v{version}: the weights of v{base_version} with a head for {cfg.classes}")
    return dg.MaterializeResult(metadata={"model_version": version, WEIGHTS_FROM: base_version, "classes": ", ".join(cfg.classes),
                                          "model_uri": registry.model_uri(version), "path": dg.MetadataValue.path(str(out.resolve())), **tags})
