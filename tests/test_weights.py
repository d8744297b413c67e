import argparse

import pytest
import torch
from safetensors.torch import save_file

from dfkd_assets.core.weights import WeightsReadError, read_state_dict


def test_reads_safetensors_and_checkpoints_and_refuses_the_rest(tmp_path):
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "ckpt.pth")
    for name in ("w.safetensors", "ckpt.pth"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == {"a", "b"} and torch.equal(got["b"], sd["b"])
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(lr=1)}, tmp_path / "foreign.pth")
    with pytest.raises(WeightsReadError, match="foreign.pth could not be read safely"):
        read_state_dict(tmp_path / "foreign.pth")
    torch.save({"state_dict": {"a": [1, 2]}}, tmp_path / "lists.pth")
    with pytest.raises(WeightsReadError, match="holds no state_dict of tensors"):
        read_state_dict(tmp_path / "lists.pth")
