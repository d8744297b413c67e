"""Assets `teacher_head` and `prompt_bank` (ALGORITHM.md §1-2).

The head comes first: the bank's diagnostics classify every prompt feature with it (does a
style keep its class?).
"""


import dagster as dg

from dfkd_assets.defs.errors import no_retry_for_bad_input

from dfkd_assets.defs.fingerprints import prompt_settings_hash
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.loaders import device_lease, head_for, style_settings, teacher_for
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings


@dg.asset(group_name="prompts", kinds={"pytorch"}, description="Zero-shot classifier: template-ensembled class text embeddings of the teacher.")
@no_retry_for_bad_input
def teacher_head(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    import torch
    from safetensors.torch import save

    from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json
    from dfkd_assets.core.teacher import zero_shot_head

    cfg = settings.load()
    with device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = zero_shot_head(teacher, cfg.classes, cfg.teacher.templates)
        out = cfg.path("teacher_head")
        atomic_write_bytes(out / "head.safetensors", save({"head": head.contiguous().cpu()}))
        atomic_write_json(out / "head.json", {"teacher_id": teacher.teacher_id, "classes": cfg.classes, "templates": cfg.teacher.templates})
        sims = (head @ head.t()).cpu()
        off = sims[~torch.eye(len(cfg.classes), dtype=torch.bool)]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out.resolve())),
                "teacher_id": teacher.teacher_id,
                "num_classes": len(cfg.classes),
                "embed_dim": int(head.shape[1]),
                "logit_scale": teacher.logit_scale,
                "max_class_cosine": float(off.max()),
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
    import mlflow

    from dfkd_assets.core.io import atomic_write_json
    from dfkd_assets.core.progress import Progress
    from dfkd_assets.core.prompts import bank_diagnostics, build_bank
    from dfkd_assets.core.report import markdown_table, write_curves_png

    cfg = settings.load()
    with device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        head = head_for(cfg, teacher, device)
        st = style_settings(cfg)
        out = cfg.path("prompt_bank")
        (out / "contrastive_loss.png").unlink(missing_ok=True)  # from an earlier contrastive bank
        tags = lineage(cfg, context, teacher_id=teacher.teacher_id)
        with mlflow_tracking.run(cfg, run_name=f"prompt-bank-{cfg.prompts.method}-{context.run.run_id[:8]}", tags={**tags, "stage": "prompt_bank"}):
            mlflow.log_params({f"prompts.{k}": str(v)[:500] for k, v in cfg.prompts.model_dump(mode="json").items()})
            prog = Progress(st.num_styles, "contrastive styles", context.log.info, unit="styles") if cfg.prompts.method == "contrastive" else None
            bank, curves = build_bank(
                teacher, cfg.classes, cfg.prompts.method, st, cfg.prompts.vanilla_template,
                on_style=(lambda j, loss: prog.update(1, loss=loss)) if prog else None,
            )
            if prog:
                prog.close()
            diag = bank_diagnostics(bank, head)
            bank.diagnostics = diag
            bank.save(out)
            atomic_write_json(out / "diagnostics.json", {**diag, "loss_curves": curves})
            mlflow.log_metrics({"mean_pairwise_cosine": diag["mean_pairwise_cosine"], "class_preserved": diag["class_preserved"]})
            if curves:
                import time

                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                series = [Metric("contrastive_loss", v, now, j * st.steps + i) for j, c in enumerate(curves) for i, v in enumerate(c)]
                series += [Metric("contrastive_final_loss", c[-1], now, j) for j, c in enumerate(curves)]
                client, run_id = mlflow_tracking.client(cfg), mlflow.active_run().info.run_id
                for i in range(0, len(series), 1000):  # the whole curve (x = global step), in MLflow's batch size
                    client.log_batch(run_id, metrics=series[i : i + 1000])
                write_curves_png(out / "contrastive_loss.png", curves, f"Contrastive-Prompt InfoNCE ({len(curves)} styles)")
            mlflow.log_artifacts(str(out), "prompt_bank")
        per_style = markdown_table(diag["per_style"][:64], ["style", "class_preserved", "mean_cosine_to_other_styles"])
        rows = [{"style": s, "class": c, "prompt": bank.prompts[i][k]} for i, s in enumerate(bank.styles) for k, c in enumerate(bank.classes)]
        meta = {
            "settings_hash": prompt_settings_hash(cfg),  # the stale_partitions sensor compares it with the current settings
            "path": dg.MetadataValue.path(str(out.resolve())),
            "method": bank.method,
            "num_styles": bank.num_styles,
            "mean_pairwise_cosine": diag["mean_pairwise_cosine"],
            "class_preserved": diag["class_preserved"],
            "per_style": dg.MetadataValue.md(per_style),
            "prompts": dg.MetadataValue.md(markdown_table(rows[:200], ["style", "class", "prompt"])),
            **tags,
        }
        if curves:
            meta["contrastive_loss_first_last"] = dg.MetadataValue.json([[round(c[0], 4), round(c[-1], 4)] for c in curves])
            meta["contrastive_loss"] = dg.MetadataValue.md(md_image(out / "contrastive_loss.png", "InfoNCE loss per style"))
        context.log.info(
            f"prompt bank ({bank.method}, {bank.num_styles} styles): mean pairwise cosine {diag['mean_pairwise_cosine']:.3f}, "
            f"class preserved {diag['class_preserved']:.3f}"
        )
        return dg.MaterializeResult(metadata=meta)
