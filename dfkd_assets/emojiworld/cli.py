"""`dfkd emojiworld {fetch,build,pin}`: registered into dfkd's CLI by `register(subparsers)`."""

from __future__ import annotations

from pathlib import Path


def _settings(path):
    from dfkd_assets.config import validate
    from dfkd_assets.emojiworld.config import EmojiworldConfig

    raw = None
    if path:
        import yaml

        raw = yaml.safe_load(Path(path).read_text())
    return validate(EmojiworldConfig, raw or {}, str(path or "the built-in emoji world defaults"))


def _cmd_fetch(args) -> int:
    from dfkd_assets.emojiworld import sources

    for k, p in sources.fetch(Path(args.npm_dir)).items():
        print(f"{k}: {p} (sha256 checked; {sources.PACKAGES[k].licence})")
    return 0


def _cmd_build(args) -> int:
    from dfkd_assets.emojiworld.build import build

    m = build(_settings(args.settings), Path(args.out), force=args.force, train=args.train, npm_dir=Path(args.npm_dir),
              parallel=args.parallel)
    print(f"emojiworld in {args.out} ({m.get('source')}): teacher zero-shot on held-out members "
          + ", ".join(f"{d} {a:.3f}" for d, a in m["teacher_zero_shot"].items()) + f", mean {m['teacher_zero_shot_mean']:.3f}")
    return 0


def _cmd_pin(args) -> int:
    from dfkd_assets.emojiworld.build import pin

    print(f"pinned: {pin(Path(args.dir))} (commit it)")
    return 0


def register(sub) -> None:
    from dfkd_assets.emojiworld.sources import DEFAULT_CACHE

    ew = sub.add_parser("emojiworld", help="world 2: concept classes of open emoji artwork (issue 35)").add_subparsers(dest="ew_cmd", required=True)
    f = ew.add_parser("fetch", help="npm pack the emoji packages into the cache folder and check their sha256")
    f.add_argument("--npm-dir", default=str(DEFAULT_CACHE))
    f.set_defaults(fn=_cmd_fetch)
    b = ew.add_parser("build", help="build world 2: checked packages, member split, pinned (or trained) tiny CLIP/VQGAN, eval set")
    b.add_argument("--out", required=True, help="output folder, e.g. storage/emoji")
    b.add_argument("--settings", help="YAML of EmojiworldConfig values (default: the pinned settings)")
    b.add_argument("--npm-dir", default=str(DEFAULT_CACHE), help="where the package tarballs are (filled by make install)")
    b.add_argument("--force", action="store_true")
    b.add_argument("--train", action="store_true", help="train the tiny CLIP and VQGAN here even when these settings are pinned")
    b.add_argument("--parallel", action="store_true", help="with training: the VQGAN in a second process (2 cores)")
    b.set_defaults(fn=_cmd_build)
    p = ew.add_parser("pin", help="ship a trained world's weights: copy them to dfkd_assets/emojiworld/pinned/<settings hash>/")
    p.add_argument("dir")
    p.set_defaults(fn=_cmd_pin)
