"""Jobs over the asset graph. Selections are strings on purpose: they exercise Dagster's
selection parser, which breaks silently when dvc's antlr4 pin wins (DEPENDENCIES.md #1)."""

from __future__ import annotations

import dagster as dg

PREPARE = "prepare_prompts"
SYNTHESIZE = "synthesize_class"
TRAIN = "distill_evaluate_promote"


def build_jobs() -> list:
    return [
        dg.define_asset_job(PREPARE, selection="key:teacher_head or key:prompt_bank", description="Teacher head and prompt bank."),
        dg.define_asset_job(
            SYNTHESIZE, selection='key:"synthetic_images"',
            description="VQGAN-CLIP images of one class (one run per class partition, or a backfill).",
        ),
        dg.define_asset_job(TRAIN, selection="key:synthetic_dataset+", description="Snapshot (DVC), distil, evaluate, promote."),
    ]
