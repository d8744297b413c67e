"""Reading third-party weight files safely: safetensors, or torch pickles through the weights-only
unpickler (plus an optional allow-list of named globals). One reader for every loader, so no
loader ever falls back to a blanket unpickle."""

from __future__ import annotations

from pathlib import Path

import torch


class WeightsReadError(ValueError):
    pass


def read_state_dict(path: Path, allowed_globals: list | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `path` (a `state_dict` entry of a training checkpoint if there is one).

    `allowed_globals`: `(stand_in, "module.Name")` pairs for torch.serialization.safe_globals.
    Raises WeightsReadError (unreadable, truncated, a refused global, no tensors); callers add the
    setting that names the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        with torch.serialization.safe_globals(allowed_globals or []):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsReadError(f"{path} could not be read safely: {str(e).splitlines()[0][:400]}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsReadError(f"{path} holds no state_dict of tensors")
    return sd
