import sys

import pytest
import torch

from conftest import TINY_VQGAN
from dfkd_assets.core.vqgan import GeneratorLoadError, codebook, decode, load_vqgan, quantize_st, read_model_params


def test_real_taming_class_imports_through_compat_stub(vqgan):
    from taming.models.vqgan import VQModel

    assert isinstance(vqgan, VQModel)
    assert "pytorch_lightning.utilities.distributed" not in sys.modules
    assert isinstance(vqgan.loss, torch.nn.Identity)  # no LPIPS/VGG download


def test_quantize_st_forward_is_nearest_code_and_gradient_is_identity():
    book = torch.randn(10, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq = quantize_st(z, book)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = book[torch.cdist(flat, book).argmin(1)]
    torch.testing.assert_close(zq.detach().permute(0, 2, 3, 1).reshape(-1, 4), nearest)
    w = torch.randn_like(zq)
    (zq * w).sum().backward()
    torch.testing.assert_close(z.grad, w)



def test_quantize_st_picks_fp32_codes_inside_bf16_autocast():
    """bf16 autocast (the engine's default on GPU) must not reach the code distances: at the f16
    codebook's size a bf16 matmul picks another code at about 1 % of positions."""
    g = torch.Generator().manual_seed(0)
    book, z = torch.randn(16384, 256, generator=g), torch.randn(2, 256, 14, 14, generator=g)
    fp32 = quantize_st(z, book)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = quantize_st(z, book)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, fp32, rtol=0, atol=0)

def test_decode_shape(vqgan):
    z = codebook(vqgan)[:64].view(1, 8, 8, 16).permute(0, 3, 1, 2)
    assert decode(vqgan, z).shape == (1, 3, 32, 32)


def _lightning_ckpt(model, path, drop=None, extra=None):
    sd = dict(model.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # training-only keys are ignored
    if drop:
        sd.pop(drop)
    if extra:
        sd[extra] = torch.zeros(1)
    # the structure of the published vqgan_imagenet_f16_16384 last.ckpt (Lightning 1.x): the weights
    # next to optimizer states, schedulers and a callbacks dict keyed by the ModelCheckpoint class
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    opt_state = {"state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                 "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "params": [0]}]}
    torch.save({"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.0.8",
                "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.5),
                                                "best_model_path": "/logs/last.ckpt"}},
                "optimizer_states": [opt_state, opt_state], "lr_schedulers": [], "state_dict": sd}, path)


def test_checkpoint_loads_strictly(vqgan, tmp_path, cpu):
    src = load_vqgan(TINY_VQGAN, None, 123, cpu)
    _lightning_ckpt(src, tmp_path / "last.ckpt")
    loaded = load_vqgan(TINY_VQGAN, tmp_path / "last.ckpt", 0, cpu)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)

    key = "decoder.conv_out.weight"
    _lightning_ckpt(src, tmp_path / "missing.ckpt", drop=key)
    with pytest.raises(GeneratorLoadError, match="missing keys.*decoder.conv_out.weight"):
        load_vqgan(TINY_VQGAN, tmp_path / "missing.ckpt", 0, cpu)
    _lightning_ckpt(src, tmp_path / "extra.ckpt", extra="decoder.bogus")
    with pytest.raises(GeneratorLoadError, match="unexpected keys.*decoder.bogus"):
        load_vqgan(TINY_VQGAN, tmp_path / "extra.ckpt", 0, cpu)


def test_checkpoint_with_foreign_pickle_global_is_refused(tmp_path, cpu):
    import argparse

    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=1)}, tmp_path / "evil.ckpt")
    with pytest.raises(GeneratorLoadError, match="could not be read safely"):
        load_vqgan(TINY_VQGAN, tmp_path / "evil.ckpt", 0, cpu)


class _Payload:
    """Pickles as a call to os.system: what a hostile checkpoint would smuggle in."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_execute_code_is_refused_unexecuted(tmp_path, cpu):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "callbacks": {"x": _Payload(marker)}}, tmp_path / "hostile.ckpt")
    with pytest.raises(GeneratorLoadError, match="could not be read safely.*allow-listed"):
        load_vqgan(TINY_VQGAN, tmp_path / "hostile.ckpt", 0, cpu)
    assert not marker.exists()


def test_truncated_checkpoint_names_the_file(vqgan, tmp_path, cpu):
    _lightning_ckpt(vqgan, tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GeneratorLoadError, match="cut.ckpt"):
        load_vqgan(TINY_VQGAN, tmp_path / "cut.ckpt", 0, cpu)


def test_missing_files_name_the_setting(tmp_path, cpu):
    with pytest.raises(GeneratorLoadError, match="generator.config_file"):
        read_model_params(tmp_path / "nope.yaml")
    with pytest.raises(GeneratorLoadError, match="generator.checkpoint"):
        load_vqgan(TINY_VQGAN, tmp_path / "nope.ckpt", 0, cpu)


@pytest.mark.slow
def test_full_size_imagenet_f16_checkpoint_in_its_published_structure_loads(tmp_path, cpu):
    """vqgan_imagenet_f16_16384 with random weights, saved as the published Lightning .ckpt."""
    from conftest import ROOT

    config = ROOT / "configs" / "models" / "vqgan_imagenet_f16_16384.yaml"
    src = load_vqgan(config, None, 5, cpu)
    assert codebook(src).shape == (16384, 256)
    _lightning_ckpt(src, tmp_path / "last.ckpt")
    loaded = load_vqgan(config, tmp_path / "last.ckpt", 0, cpu)
    for k in ("quantize.embedding.weight", "decoder.conv_out.weight", "encoder.conv_in.weight"):
        torch.testing.assert_close(loaded.state_dict()[k], src.state_dict()[k])
    del src, loaded
