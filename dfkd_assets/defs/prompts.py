"""Assets `teacher_head` and `prompt_bank` (stages in dfkd_assets/stages/prompts.py).

The head comes first: the bank's diagnostics classify every prompt feature with it (does a
style keep its class?).
"""


import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings
from dfkd_assets.fingerprints import prompt_settings_hash
from dfkd_assets.loaders import device_lease, teacher_for


@dg.asset(group_name="prompts", kinds={"pytorch"}, description="Zero-shot classifier: template-ensembled class text embeddings of the teacher.")
@no_retry_for_bad_input
def teacher_head(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    import torch

    from dfkd_assets.stages.prompts import build_head

    cfg = settings.load()
    with device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = build_head(cfg, teacher)
        out = artifacts.write_teacher_head(cfg, head, teacher.teacher_id)
        sims = (head @ head.t()).cpu()
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out.resolve())),
                "teacher_id": teacher.teacher_id,
                "num_classes": len(cfg.classes),
                "embed_dim": int(head.shape[1]),
                "logit_scale": teacher.logit_scale,
                "max_class_cosine": float(sims[~torch.eye(len(cfg.classes), dtype=torch.bool)].max()),
                **lineage(cfg, context),
            }
        )


@dg.asset(
    group_name="prompts",
    deps=[teacher_head],
    kinds={"pytorch", "mlflow"},
    description="Class names x diversified styles (prompts.method) with their teacher text features (synthesis targets) and diagnostics.",
)
@no_retry_for_bad_input
def prompt_bank(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.progress import Progress
    from dfkd_assets.stages.prompts import build_prompt_bank

    cfg = settings.load()
    with device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = artifacts.read_teacher_head(cfg, teacher, device)
        tags = lineage(cfg, context, teacher_id=teacher.teacher_id)
        with mlflow_tracking.run(cfg, run_name=f"prompt-bank-{cfg.prompts.method}-{context.run.run_id[:8]}", tags={**tags, "stage": "prompt_bank"}) as run:
            prog = Progress(cfg.prompts.num_styles, "contrastive styles", context.log.info, unit="styles") if cfg.prompts.method == "contrastive" else None
            bank, curves = build_prompt_bank(cfg, teacher, head, on_style=(lambda j, loss: prog.update(1, loss=loss)) if prog else None)
            if prog:
                prog.close()
            out = artifacts.write_prompt_bank(cfg, bank, curves)
            _track_bank(cfg, mlflow_tracking, run.info.run_id, bank, curves, out)
        diag = bank.diagnostics
        context.log.info(
            f"prompt bank ({bank.method}, {bank.num_styles} styles): mean pairwise cosine {diag['mean_pairwise_cosine']:.3f}, "
            f"class preserved {diag['class_preserved']:.3f}"
        )
        return dg.MaterializeResult(metadata={**_bank_metadata(cfg, bank, curves, out), **tags})


def _track_bank(cfg, mlflow_tracking: MlflowTracking, run_id: str, bank, curves: list[list[float]], out) -> None:
    """Prompt settings as params, diagnostics as metrics, the whole contrastive curves (x = global step), the bank's files."""
    from dfkd_assets.core.report import write_curves_png

    mlflow_tracking.log(params={f"prompts.{k}": str(v)[:500] for k, v in cfg.prompts.model_dump(mode="json").items()},
                        metrics={"mean_pairwise_cosine": bank.diagnostics["mean_pairwise_cosine"], "class_preserved": bank.diagnostics["class_preserved"]})
    (out / "contrastive_loss.png").unlink(missing_ok=True)  # from an earlier contrastive bank
    if curves:
        steps = cfg.prompts.steps
        mlflow_tracking.log_series(cfg, run_id, "contrastive_loss", [(j * steps + i, v) for j, c in enumerate(curves) for i, v in enumerate(c)])
        mlflow_tracking.log_series(cfg, run_id, "contrastive_final_loss", [(j, c[-1]) for j, c in enumerate(curves)])
        write_curves_png(out / "contrastive_loss.png", curves, f"Contrastive-Prompt InfoNCE ({len(curves)} styles)")
    mlflow_tracking.log(files=out, artifact_path="prompt_bank")


def _bank_metadata(cfg, bank, curves: list[list[float]], out) -> dict:
    from dfkd_assets.core.report import markdown_table

    diag = bank.diagnostics
    rows = [{"style": s, "class": c, "prompt": bank.prompts[i][k]} for i, s in enumerate(bank.styles) for k, c in enumerate(bank.classes)]
    meta = {
        "settings_hash": prompt_settings_hash(cfg),  # the stale_partitions sensor compares it with the current settings
        "path": dg.MetadataValue.path(str(out.resolve())),
        "method": bank.method,
        "num_styles": bank.num_styles,
        "mean_pairwise_cosine": diag["mean_pairwise_cosine"],
        "class_preserved": diag["class_preserved"],
        "per_style": dg.MetadataValue.md(markdown_table(diag["per_style"][:64], ["style", "class_preserved", "mean_cosine_to_other_styles"])),
        "prompts": dg.MetadataValue.md(markdown_table(rows[:200], ["style", "class", "prompt"])),
    }
    if curves:
        meta["contrastive_loss_first_last"] = dg.MetadataValue.json([[round(c[0], 4), round(c[-1], 4)] for c in curves])
        meta["contrastive_loss"] = dg.MetadataValue.md(md_image(out / "contrastive_loss.png", "InfoNCE loss per style"))
    return meta
