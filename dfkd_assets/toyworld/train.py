"""Training the toyworld's foundation models: a tiny CLIP (contrastive, on captioned world images of
every domain) and a tiny taming VQGAN (VQ autoencoder). Both are saved in the formats real weights
come in, and loaded back through the pipeline's own loaders.

Nothing here downloads anything: the VQGAN is trained with L1 + L2 reconstruction and taming's
codebook loss instead of LPIPS + discriminator (which need VGG weights). Dead codebook entries are
restarted from encoder outputs, so uniform random code indices (the synthesis init) decode to
world-like images.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_assets.toyworld import world
from dfkd_assets.toyworld.config import ToyClipConfig, ToyVqganConfig

Log = Callable[[str], None]


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_clip(model, tokenizer, images: np.ndarray, cls: np.ndarray, dom: np.ndarray, cols: list[str], settings: ToyClipConfig,
               seed: int, log: Log, caption: Callable[[int, np.random.Generator], str] | None = None) -> list[float]:
    """CLIP's symmetric InfoNCE on (image, caption) pairs; captions are re-drawn every time an image is used
    (`caption(i, gen)`: image i's; default the toyworld's, from cls/dom/cols)."""
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    params_decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    params_other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    steps, batch, lr = settings.steps, settings.batch_size, settings.lr
    opt = torch.optim.AdamW([{"params": params_decay, "weight_decay": settings.weight_decay}, {"params": params_other, "weight_decay": 0.0}],
                            lr=lr, betas=settings.betas)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, max(1, steps // 20))
        idx = gen.integers(len(images), size=batch)
        x = (x_all[idx].float() / 255 - mean) / std
        if gen.random() < 0.5:
            x = x.flip(-1)
        texts = [caption(i, gen) if caption else world.caption(world.CLASSES[cls[i]], world.DOMAINS[dom[i]], cols[i], gen) for i in idx]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        # identical captions (e.g. two "a star") are not negatives of each other
        ids = {t: i for i, t in enumerate(texts)}
        key = torch.tensor([ids[t] for t in texts])
        same = (key[:, None] == key[None, :]) & ~torch.eye(batch, dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"tiny CLIP: step {step + 1}/{steps}, loss {np.mean(losses[-50:]):.3f} "
                f"({(step + 1) / el:.1f} steps/s, ETA {el / (step + 1) * (steps - step - 1):.0f} s)")
    model.eval()
    return losses


def train_vqgan(model, images: np.ndarray, settings: ToyVqganConfig, seed: int, log: Log) -> dict:
    """VQ autoencoder training: L1 + L2 reconstruction + codebook/commitment loss, dead-code restarts."""
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    params = list(model.encoder.parameters()) + list(model.decoder.parameters()) + list(model.quant_conv.parameters()) \
        + list(model.post_quant_conv.parameters()) + list(model.quantize.parameters())
    steps, batch, lr = settings.steps, settings.batch_size, settings.lr
    opt = torch.optim.Adam(params, lr=lr, betas=settings.betas)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    book = model.quantize.embedding.weight
    usage = torch.zeros(book.shape[0])
    rec_hist, t0 = [], time.perf_counter()
    restart_every = max(50, steps // 20)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, max(1, steps // 20))
        idx = gen.integers(len(images), size=batch)
        x = x_all[idx].float() / 127.5 - 1
        h = model.quant_conv(model.encoder(x))
        quant, qloss, (_, _, codes) = model.quantize(h)
        xrec = model.decoder(model.post_quant_conv(quant))
        rec = (x - xrec).abs().mean() + F.mse_loss(xrec, x)
        loss = rec + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=book.shape[0]).float()
        rec_hist.append(rec.item())
        if (step + 1) % restart_every == 0 and step + 1 < steps * 0.9:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = h.detach().permute(0, 2, 3, 1).reshape(-1, book.shape[1])
                    pick = torch.from_numpy(gen.integers(len(z), size=len(dead)))
                    book[dead] = z[pick] + 0.01 * torch.randn(len(dead), book.shape[1])
            usage.zero_()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"tiny VQGAN: step {step + 1}/{steps}, reconstruction {np.mean(rec_hist[-50:]):.4f} ({(step + 1) / el:.1f} steps/s)")
    model.eval()
    return {"final_reconstruction_loss": float(np.mean(rec_hist[-50:]))}


def save_clip(model, model_cfg: dict, name: str, out: Path) -> tuple[Path, Path]:
    """open_clip model config JSON + weights file, as open_clip's own pretrained checkpoints."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / f"{name}.json"
    cfg_path.write_text(json.dumps(model_cfg, indent=2))
    w_path = out / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(w_path))
    return cfg_path, w_path


def save_vqgan(model, params: dict, out: Path, step: int) -> tuple[Path, Path]:
    """taming-style `last.ckpt` (a dict with `state_dict`) + `config.yaml` (model.target/params)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                  "params": {**params, "lossconfig": {"target": "torch.nn.Identity"}}}}, sort_keys=False))
    ck = out / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": step, "epoch": 0}, ck)
    return cfg_path, ck
