"""Core settings objects for unit tests, built the way the product builds them: from the pydantic
tree's defaults (dfkd_assets/config.py) through dfkd_assets/loaders.py, so a test that changes one
value keeps every other default of the product. Keys of the config section go through the config
(validated); any other field of the core dataclass (bf16, style_words, ...) is replaced after."""

import dataclasses

import torch

from dfkd_assets import loaders
from dfkd_assets.config import DfkdConfig

CPU = torch.device("cpu")
VANILLA = DfkdConfig.model_fields["prompts"].annotation.model_fields["vanilla_template"].default  # prompts.vanilla_template


def _build(section: str, mapper, over: dict):
    fields = DfkdConfig.model_fields[section].annotation.model_fields
    cfg = DfkdConfig.model_validate({"classes": ["a", "b"], "generator": {"config_file": "unused.yaml"},
                                     section: {k: v for k, v in over.items() if k in fields}})
    return dataclasses.replace(mapper(cfg), **{k: v for k, v in over.items() if k not in fields})


def synthesis_settings(device: torch.device = CPU, **over):
    return _build("synthesis", lambda cfg: loaders.synthesis_settings(cfg, device), over)


def distill_settings(device: torch.device = CPU, **over):
    return _build("distill", lambda cfg: loaders.distill_settings(cfg, device), over)


def style_settings(**over):
    return _build("prompts", loaders.style_settings, over)


def fewshot_settings(**over):
    return _build("fewshot", loaders.fewshot_settings, {k: (list(v) if k in ("shots", "seeds") else v) for k, v in over.items()})
