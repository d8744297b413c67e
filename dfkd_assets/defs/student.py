"""Asset `student_model`: knowledge distillation on the snapshot, tracked and registered in MLflow.

Resumes from the per-epoch checkpoint when the fingerprint (settings, teacher, data hash) is
unchanged. Registers a new model version (taken from `log_model`'s return value, never "the
highest version"), tags it with its lineage and points the alias `challenger` at it.
"""


import hashlib
import json

import dagster as dg

from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.placement import GPU_OP_TAGS
import yaml

from dfkd_assets.defs.lineage import lineage
from dfkd_assets.loaders import device_lease, distill_settings, head_for, teacher_for
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings
from dfkd_assets.redaction import redact

PIP_REQUIREMENTS = ["torch", "torchvision", "timm", "dfkd-assets"]


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


@dg.asset(
    group_name="training",
    deps=["synthetic_dataset", "teacher_head"],
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="Student distilled from the teacher on the synthetic snapshot; new MLflow model version, alias `challenger`.",
)
@no_retry_for_bad_input
def student_model(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    from dfkd_assets.core.io import atomic_write_json, atomic_write_text, read_shard
    from dfkd_assets.core.progress import Progress
    from dfkd_assets.core.distill import distill
    from dfkd_assets.core.student import build_student

    cfg = settings.load()
    with device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = head_for(cfg, teacher, device)
        dvc_file = cfg.workspace / "data" / "synthetic.dvc"
        if not dvc_file.is_file():
            raise FileNotFoundError(f"{dvc_file} not found: materialize synthetic_dataset first")
        dvc_hash = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]

        images, labels = [], []
        for k, c in enumerate(cfg.classes):
            imgs, _ = read_shard(cfg.class_dir(c), verify=True)
            images.append(imgs)
            labels += [k] * len(imgs)
        images_t = torch.from_numpy(np.concatenate(images))
        labels_t = torch.tensor(labels)
        dset = distill_settings(cfg, device)
        fingerprint = hashlib.sha256(
            json.dumps({"distill": cfg.distill.model_dump(), "student": cfg.student.model_dump(), "teacher": teacher.teacher_id, "data": dvc_hash}, sort_keys=True).encode()
        ).hexdigest()[:16]
        tags = lineage(cfg, context, dvc_hash=dvc_hash, teacher_id=teacher.teacher_id, fingerprint=fingerprint)
        student = build_student(cfg.student.arch, cfg.classes, cfg.student.input_size, cfg.student.init_seed)
        out = cfg.path("student")
        steps = dset.epochs * ((len(labels) + dset.batch_size - 1) // dset.batch_size)

        with mlflow_tracking.run(cfg, run_name=f"student-{context.run.run_id[:8]}", tags=tags) as run:
            public = cfg.public_dump()  # URL passwords masked: params, artifacts and params.yaml are read by people
            mlflow.log_params(_flatten(public))
            mlflow.log_text(yaml.safe_dump(public, sort_keys=False), "config.yaml")
            prog = Progress(steps, "distillation", context.log.info, unit="steps")

            def on_epoch(rec: dict) -> None:
                mlflow.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=rec["epoch"])

            history = distill(
                student, teacher, head, images_t, labels_t, dset, checkpoint_dir=cfg.work_dir / "student",
                fingerprint=fingerprint, on_epoch=on_epoch, on_step=prog.update,
            )
            prog.close()
            student = student.cpu().eval()
            student.save(out)
            csv = "epoch,kd_loss,teacher_agreement,lr\n" + "".join(f"{h['epoch']},{h['kd_loss']},{h['teacher_agreement']},{h['lr']}\n" for h in history)
            atomic_write_text(out / "history.csv", csv)
            atomic_write_text(cfg.data_dir / "params.yaml", yaml.safe_dump(public, sort_keys=False))
            example = np.random.default_rng(0).random((1, 3, cfg.student.input_size, cfg.student.input_size), dtype=np.float32)
            info = mlflow.pytorch.log_model(
                student, name="student", registered_model_name=cfg.mlflow.registered_model_name,
                input_example=example, pip_requirements=PIP_REQUIREMENTS, serialization_format="pickle",
            )
            version = str(info.registered_model_version)
            client = mlflow_tracking.client(cfg)
            for key, value in tags.items():
                client.set_model_version_tag(cfg.mlflow.registered_model_name, version, key, value)
            client.set_registered_model_alias(cfg.mlflow.registered_model_name, "challenger", version)
            run_id = run.info.run_id
        registry = {"model_name": cfg.mlflow.registered_model_name, "version": version, "run_id": run_id, "dvc_hash": dvc_hash, "fingerprint": fingerprint}
        atomic_write_json(out / "registry.json", registry)
        last = history[-1]
        context.log.info(f"student v{version}: final KD loss {last['kd_loss']:.4f}, teacher agreement {last['teacher_agreement']:.3f}")
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "mlflow_run_id": run_id,
                "mlflow_tracking_uri": redact(mlflow_tracking.uri(cfg)),
                "model_uri": f"models:/{cfg.mlflow.registered_model_name}/{version}",
                "path": dg.MetadataValue.path(str(out.resolve())),
                "final_kd_loss": last["kd_loss"],
                "final_teacher_agreement": last["teacher_agreement"],
                "epochs": len(history),
                "num_train_images": len(labels),
                "history": dg.MetadataValue.md(
                    "| epoch | kd_loss | teacher_agreement |\n|---|---|---|\n"
                    + "\n".join(f"| {h['epoch']} | {h['kd_loss']:.4f} | {h['teacher_agreement']:.3f} |" for h in history)
                ),
                **tags,
            }
        )
