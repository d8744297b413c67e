"""Settings of the emoji world build (`dfkd emojiworld build --settings FILE`): which Unicode
subgroups make which class, the member split, rendering, and the tiny CLIP and VQGAN trained on it.
Changing any value rebuilds the world (cached on the hash of these settings)."""

from __future__ import annotations

from pydantic import Field

from dfkd_assets.config import SettingsModel
from dfkd_assets.pinned_world import settings_hash
from dfkd_assets.toyworld.config import ToyClipConfig, ToyVqganConfig

# class name (a word a user would type) -> emoji-datasource subcategories (Unicode subgroups) of its members
DEFAULT_CLASSES = {
    "mammal": ["animal-mammal"],
    "bird": ["animal-bird"],
    "sea animal": ["animal-marine"],
    "bug": ["animal-bug"],
    "fruit": ["food-fruit"],
    "vegetable": ["food-vegetable"],
    "drink": ["drink"],
    "building": ["place-building"],
    "vehicle": ["transport-ground"],
    "plant": ["plant-flower", "plant-other"],
    "clothing": ["clothing"],
    "instrument": ["musical-instrument"],
}


class EmojiClipConfig(ToyClipConfig):
    context_length: int = Field(24, ge=8)
    steps: int = Field(3000, gt=0)


class EmojiVqganConfig(ToyVqganConfig):
    n_embed: int = Field(256, gt=1)
    steps: int = Field(1200, gt=0)


class EmojiworldConfig(SettingsModel):
    """World 2: concept classes of many emoji members, 4 styles (domains), held-out members."""

    seed: int = 0
    classes: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_CLASSES))
    max_members: int = Field(0, ge=0, description="at most this many members per class (0: all); small worlds for tests")
    heldout_fraction: float = Field(1 / 3, gt=0, lt=1, description="share of each class's members only the evaluation sees")
    image_size: int = Field(32, ge=16, multiple_of=4)
    train_images: int = Field(24000, gt=0, description="pre-rendered captioned images of the teacher's members for CLIP/VQGAN")
    eval_per_class: int = Field(40, gt=0, description="held-out evaluation images per class and domain")
    seen_eval_per_class: int = Field(20, ge=0, description="images per class and domain of the teacher's own members (reported)")
    clip: EmojiClipConfig = EmojiClipConfig()
    vqgan: EmojiVqganConfig = EmojiVqganConfig()

    def settings_hash(self) -> str:
        return settings_hash(self)
