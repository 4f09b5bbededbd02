"""Safe weight loading: safetensors, or ``torch.load(weights_only=True)``; never a plain unpickle."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medvlsam2.core.encoder import LoadReport
from medvlsam2.core.errors import InputError


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from ``path``; ``key`` selects a nested dict (e.g. ``"model"``).

    Files that need arbitrary unpickling are refused with an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"cannot load weights safely from {path}: {first}") from err
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            raise InputError(f"weights file {path} has no entry '{key}'")
        state = state[key]
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"weights file {path} does not hold a state dict")
    return state


def load_state_dict_into(
    module: nn.Module, path: str | Path, *, prefix: str = "", key: str | None = None
) -> LoadReport:
    """Load matching tensors (strict=False) and report what was missing or unexpected."""
    state = read_state_dict(path, key)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = module.load_state_dict(state, strict=False)
    return LoadReport(
        path=str(path),
        loaded=len(state) - len(result.unexpected_keys),
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
    )


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values as raw bytes in its own dtype (the same on every machine): what weight
    digests and fingerprints hash."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
