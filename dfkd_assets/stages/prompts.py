"""Stages 1-2: the teacher's zero-shot head and the diversified prompt bank (docs/ALGORITHM.md §1-2)."""

from __future__ import annotations

from typing import Callable

from dfkd_assets.config import DfkdConfig


def build_head(cfg: DfkdConfig, teacher):
    """Template-ensembled class embeddings [K,D]: the zero-shot classifier and KD's targets."""
    from dfkd_assets.core.teacher import zero_shot_head

    return zero_shot_head(teacher, cfg.classes, cfg.teacher.templates)


def build_prompt_bank(cfg: DfkdConfig, teacher, head, on_style: Callable[[int, float], None] | None = None):
    """(bank with its diagnostics, contrastive loss curves) for `prompts.method`."""
    from dfkd_assets.core.prompts import bank_diagnostics, build_bank
    from dfkd_assets.loaders import style_settings

    bank, curves = build_bank(teacher, cfg.classes, cfg.prompts.method, style_settings(cfg), cfg.prompts.vanilla_template, on_style=on_style)
    bank.diagnostics = bank_diagnostics(bank, head)
    return bank, curves
