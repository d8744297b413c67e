"""Settings of the toyworld build (`dfkd toyworld build --settings FILE`): rendering, the tiny
foundation models trained on it, and the held-out evaluation set. Kept beside the toyworld code:
the pipeline's own settings tree (dfkd_assets/config.py) never refers to them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dfkd_assets.config import SettingsModel
from dfkd_assets.pinned_world import later_field, settings_hash


class ToyClipConfig(SettingsModel):
    """Tiny CLIP of the toyworld (an open_clip architecture registered from JSON)."""

    embed_dim: int = Field(64, gt=0)
    vision_tower: Literal["resnet", "vit"] = Field(
        "resnet", description="open_clip ModifiedResNet (learns far faster from scratch at 32 px) or a ViT with patch_size"
    )
    vision_width: int = Field(32, gt=0)
    vision_layers: int = Field(1, gt=0, description="resnet: blocks per stage (4 stages); vit: transformer layers")
    patch_size: int = Field(4, gt=0, description="vit only")
    text_width: int = Field(64, gt=0)
    text_layers: int = Field(2, gt=0)
    context_length: int = Field(16, ge=8)
    steps: int = Field(2400, gt=0)
    batch_size: int = Field(128, gt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = later_field(0.1, "AdamW decay of the weight matrices (not of embeddings, biases, norms, the logit scale)", ge=0)
    betas: tuple[float, float] = later_field((0.9, 0.98), "AdamW betas (CLIP's: a short second-moment memory)")


class ToyVqganConfig(SettingsModel):
    """Tiny taming VQModel of the toyworld (factor 4: 8x8 latent grid at 32 px)."""

    ch: int = Field(32, gt=0, multiple_of=32)
    n_embed: int = Field(128, gt=1)
    embed_dim: int = Field(32, gt=0)
    steps: int = Field(800, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(4.5e-4, gt=0)
    betas: tuple[float, float] = later_field((0.5, 0.9), "Adam betas (taming's VQGAN training)")


class ToyworldConfig(SettingsModel):
    """The offline miniature world: rendering, tiny foundation models, held-out evaluation set.

    Changing any value rebuilds the world (`dfkd toyworld build` caches on the hash of these settings).
    """

    seed: int = 0
    image_size: int = Field(32, ge=16, multiple_of=4)
    train_images: int = Field(12000, gt=0, description="pre-rendered captioned images for CLIP/VQGAN training")
    eval_per_class: int = Field(40, gt=0, description="held-out images per class and domain")
    clip: ToyClipConfig = ToyClipConfig()
    vqgan: ToyVqganConfig = ToyVqganConfig()

    def settings_hash(self) -> str:
        return settings_hash(self)
