"""Rounds of synthesis: the pure rules of growing a class's image set (docs/ARCHITECTURE.md, rounds).

Round 0 is `synthesis.images_per_class` (the `synthetic_images` partition of the class); round
r >= 1 adds `operations.images_per_round` images drawn from seeds no other round uses. What a
round may add is bounded by `operations.max_images_per_class`: growth stops at the cap (a round
that would cross it is not made), and a cap below what already exists is an error, never a
deletion (only `dfkd rounds drop` deletes a round).
"""

from __future__ import annotations

from dataclasses import dataclass


class CapError(ValueError):
    """The settings and the images on disk disagree about the cap (names the setting)."""


@dataclass(frozen=True)
class Growth:
    """What the next round would do: `fits` False when it would cross the cap (`reason` says why)."""

    round: int
    images_after: int  # per class, once the round exists
    fits: bool
    reason: str


def round_seed_parts(seed: int, class_name: str, round_: int, index: int) -> tuple:
    """What derive_seed gets for image `index` of round `round_`: round 0 keeps today's
    (seed, class, index), later rounds add the round, so no two rounds share a seed."""
    return (seed, class_name, index) if round_ == 0 else (seed, class_name, "round", round_, index)


def check_cap(images_per_class: dict[str, int], cap: int | None) -> None:
    """CapError when a class already holds more images than `operations.max_images_per_class`."""
    over = {c: n for c, n in images_per_class.items() if cap is not None and n > cap}
    if over:
        raise CapError(f"operations.max_images_per_class ({cap}) is below the images that exist: "
                       + ", ".join(f"{c} {n}" for c, n in over.items())
                       + ". Nothing is deleted by a setting: raise the cap, or remove rounds with `dfkd rounds drop <round>`")


def next_growth(next_round: int, images_now: int, images_per_round: int, cap: int | None) -> Growth:
    """Whether round `next_round` (adding `images_per_round` to a class holding `images_now`) fits under the cap."""
    after = images_now + images_per_round
    if cap is not None and after > cap:
        return Growth(next_round, images_now, False,
                      f"operations.max_images_per_class ({cap}) reached: {images_now} images per class, a round of "
                      f"operations.images_per_round ({images_per_round}) would make {after}; growth stopped")
    return Growth(next_round, after, True, f"round {next_round}: {images_now} -> {after} images per class")


def style_offset(seed: int, round_: int, num_styles: int) -> int:
    """Where round `round_` starts the round-robin over the bank's styles: 0 for round 0 (today's
    assignment), a round-dependent offset after, so a round smaller than the number of styles
    does not always use the first ones."""
    from dfkd_assets.core.seeding import derive_seed

    return 0 if round_ == 0 else derive_seed(seed, "style-offset", round_) % num_styles
