"""The VQGAN generator (taming-transformers `VQModel`), loaded strictly and without training objects.

Why a compat step: taming's `vqgan.py` imports `taming.main` for `instantiate_from_config`, and
`taming.main` imports training-only pytorch-lightning APIs removed in current releases
(`pytorch_lightning.utilities.distributed`). We register a tiny `taming.main` exposing only
`instantiate_from_config` before the import, so inference and latent optimisation run on the
real taming classes. The training loss (LPIPS + discriminator) would download VGG weights, so it
is replaced by `torch.nn.Identity`; its checkpoint keys (`loss.*`) are ignored when loading.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch
import yaml

from dfkd_assets.core.devices import autocast

NO_LOSS = {"target": "torch.nn.Identity"}
IGNORED_KEY_PREFIXES = ("loss.",)


class GeneratorLoadError(RuntimeError):
    pass


def _instantiate_from_config(config: dict):
    if "target" not in config:
        raise KeyError("expected key `target` to instantiate")
    module, cls = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**config.get("params", {}) or {})


def _install_taming_compat() -> None:
    if "taming.main" not in sys.modules:
        stub = types.ModuleType("taming.main")
        stub.instantiate_from_config = _instantiate_from_config
        stub.__doc__ = "dfkd compat stub: only instantiate_from_config (the real module needs old Lightning)."
        sys.modules["taming.main"] = stub


def vqmodel_class():
    _install_taming_compat()
    from taming.models.vqgan import VQModel

    return VQModel


def read_model_params(config_file: Path) -> dict:
    config_file = Path(config_file)
    if not config_file.is_file():
        raise GeneratorLoadError(f"generator.config_file {config_file} not found")
    cfg = yaml.safe_load(config_file.read_text()) or {}
    try:
        params = dict(cfg["model"]["params"])
        params["ddconfig"], params["n_embed"], params["embed_dim"]
    except (KeyError, TypeError):
        raise GeneratorLoadError(
            f"generator.config_file {config_file} is not a taming VQModel config (needs model.params.ddconfig/n_embed/embed_dim)"
        ) from None
    return params


def build_vqgan(params: dict) -> torch.nn.Module:
    kept = {k: v for k, v in params.items() if k in {"ddconfig", "n_embed", "embed_dim", "remap", "sane_index_shape"}}
    return vqmodel_class()(lossconfig=NO_LOSS, **kept)


class _InertTrainingObject:
    """Stands in for a training-time class pickled into a published checkpoint (never executed).

    Lightning-era taming checkpoints key their `callbacks` dict by the ModelCheckpoint *class*;
    unpickling needs something hashable by that name, not the class itself.
    """

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


# Globals a published taming / Lightning 1.x checkpoint may reference outside its state_dict. They
# resolve to the inert stand-in above; any other global is refused by torch's weights-only unpickler.
ALLOWED_TRAINING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
)


def _load_state_dict(checkpoint: Path) -> dict:
    """The checkpoint's `state_dict`, unpickled by torch's weights-only unpickler plus an allow-list.

    A Lightning .ckpt holds `state_dict` next to optimizer states and callback objects; the
    allow-listed training classes become inert stand-ins, anything else (e.g. `os.system`) is
    refused before it could run.
    """
    from dfkd_assets.core.weights import WeightsReadError, read_state_dict

    try:
        return read_state_dict(checkpoint, [(_InertTrainingObject, name) for name in ALLOWED_TRAINING_GLOBALS])
    except WeightsReadError as e:
        raise GeneratorLoadError(
            f"generator.checkpoint: {e} (only tensors, plain containers and the allow-listed training objects "
            f"{list(ALLOWED_TRAINING_GLOBALS)} are accepted; the file may also be truncated)"
        ) from e


def load_vqgan(config_file: Path, checkpoint: Path | None, init_seed: int, device: torch.device) -> torch.nn.Module:
    """Real taming VQModel in eval mode with frozen weights; strict key check against the checkpoint."""
    params = read_model_params(config_file)
    if checkpoint is not None and not Path(checkpoint).is_file():  # before building a large model
        raise GeneratorLoadError(f"generator.checkpoint {checkpoint} not found")
    torch.manual_seed(init_seed)
    model = build_vqgan(params)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        sd = {k: v for k, v in _load_state_dict(checkpoint).items() if not k.startswith(IGNORED_KEY_PREFIXES)}
        own = {k for k in model.state_dict() if not k.startswith(IGNORED_KEY_PREFIXES)}
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        if missing or unexpected:
            raise GeneratorLoadError(
                f"generator.checkpoint {checkpoint} does not match generator.config_file {config_file}: "
                f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        try:
            model.load_state_dict(sd, strict=False)  # strictness checked above, modulo the ignored loss keys
        except RuntimeError as e:
            raise GeneratorLoadError(f"generator.checkpoint {checkpoint}: shapes do not match generator.config_file {config_file}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def codebook(model: torch.nn.Module) -> torch.Tensor:
    return model.quantize.embedding.weight


def downsample_factor(model: torch.nn.Module) -> int:
    return 2 ** (len(model.encoder.down) - 1)


def quantize_st(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Nearest codebook vector per position, straight-through: forward = VQ(z), gradient = identity.

    z: [B,C,h,w], book: [N,C]. Distances in fp32 even inside a bf16 autocast region, which would
    otherwise run the matmul in bf16 and pick another code at about 1 % of positions (f16 codebook).
    """
    zf = z.float().movedim(1, -1)  # B,h,w,C
    with autocast(z.device, enabled=False):
        d = zf.pow(2).sum(-1, keepdim=True) - 2 * zf @ book.float().t() + book.float().pow(2).sum(-1)
    zq = book[d.argmin(-1)].movedim(-1, 1).to(z.dtype)
    return z + (zq - z).detach()


def encode(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> continuous latents before quantisation (encoder + quant_conv)."""
    return model.quant_conv(model.encoder(x))


def decode(model: torch.nn.Module, z_q: torch.Tensor) -> torch.Tensor:
    """Quantised latents -> image in [-1, 1] (post_quant_conv + decoder)."""
    return model.decode(z_q)
