"""Assets `teacher_head` and `prompt_bank` (ALGORITHM.md §1-2).

The head comes first: the bank's diagnostics classify every prompt feature with it (does a
style keep its class?).
"""


import dagster as dg

from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.loaders import device_for, head_for, teacher_for
from dfkd_assets.defs.resources import PipelineSettings


@dg.asset(group_name="prompts", kinds={"pytorch"}, description="Zero-shot classifier: template-ensembled class text embeddings of the teacher.")
def teacher_head(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    import torch
    from safetensors.torch import save

    from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json
    from dfkd_assets.core.teacher import zero_shot_head

    cfg = settings.load()
    device = device_for(cfg)
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


@dg.asset(group_name="prompts", deps=[teacher_head], kinds={"pytorch"}, description="Prompts x styles with their teacher text features (synthesis targets).")
def prompt_bank(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    from dfkd_assets.core.prompts import bank_diagnostics, vanilla_bank
    from dfkd_assets.core.report import markdown_table

    cfg = settings.load()
    device = device_for(cfg)
    teacher = teacher_for(cfg, device)
    head = head_for(cfg, teacher, device)
    bank = vanilla_bank(teacher, cfg.classes, cfg.prompts.vanilla_template)
    out = cfg.path("prompt_bank")
    bank.save(out)
    diag = bank_diagnostics(bank, head)
    rows = [{"style": s, "class": c, "prompt": bank.prompts[i][k]} for i, s in enumerate(bank.styles) for k, c in enumerate(bank.classes)]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out.resolve())),
            "method": bank.method,
            "num_styles": bank.num_styles,
            "mean_pairwise_cosine": diag["mean_pairwise_cosine"],
            "class_preserved": diag["class_preserved"],
            "prompts": dg.MetadataValue.md(markdown_table(rows[:200], ["style", "class", "prompt"])),
            **lineage(cfg, context, teacher_id=teacher.teacher_id),
        }
    )
