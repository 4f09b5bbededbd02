"""Checkpoint files: atomic writes, reading that never unpickles arbitrary objects, and the
weights a checkpoint leaves out.

A run's checkpoints hold what training changes: the parameters some stage of the run trains,
every buffer, and the optimiser state. A parameter that no stage trains (a frozen pretrained
LLM, a frozen image encoder) is rebuilt from the config when the checkpoint is read, as an
export folder's are; the checkpoint keeps its SHA-1 under ``FROZEN_CHECKSUMS``, and reading
refuses a rebuilt weight whose digest differs (the pretrained source, the seed or a library
version changed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from medvlsam2.core.errors import InputError
from medvlsam2.core.weights import tensor_bytes


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside ``path``; on success it is fsynced and renamed
    over ``path``, on any failure removed — a killed write never leaves a partial ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning ``.ckpt`` read with ``weights_only=True``; the error names the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"cannot read checkpoint {path} safely: {first}") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose writes are atomic (temporary file, then rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)


#: Checkpoint key: ``{parameter name: SHA-1}`` of the parameters left out of its state_dict.
FROZEN_CHECKSUMS = "medvlsam2_frozen_checksums"


def weight_digest(tensor: torch.Tensor) -> str:
    """SHA-1 of a tensor's bytes."""
    return hashlib.sha1(tensor_bytes(tensor)).hexdigest()


def parameter_digests(module: nn.Module, names: set[str] | frozenset[str]) -> dict[str, str]:
    """``{name: weight_digest}`` for the named parameters of ``module`` (tied aliases included,
    each tensor hashed once)."""
    by_tensor: dict[int, str] = {}
    out = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if name in names:
            if id(param) not in by_tensor:
                by_tensor[id(param)] = weight_digest(param)
            out[name] = by_tensor[id(param)]
    return out


def check_saved_state(module: nn.Module, saved: dict[str, Any], source: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of checkpoint ``saved`` after checking that it fits ``module``.

    Every key must have the module's shape, and every key of the module must be in the
    checkpoint or among the frozen weights it left out, whose rebuilt values must match their
    digests. Raises ``InputError`` naming ``source`` otherwise.
    """
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {source} holds no 'state_dict' (not a medvlsam2 / Lightning checkpoint)")
    left_out = saved.get(FROZEN_CHECKSUMS) or {}
    own = module.state_dict()
    different = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    # Parameters only one side has mean another architecture too (e.g. a different depth).
    different += [f"{k} only in the checkpoint" for k in [*state, *left_out] if k not in own]
    different += [f"{k} missing from the checkpoint" for k in own if k not in state and k not in left_out]
    if different:
        more = f" and {len(different) - 3} more" if len(different) > 3 else ""
        raise InputError(f"checkpoint {source} comes from a different model config: {', '.join(different[:3])}{more}")
    rebuilt = parameter_digests(module, {k for k in left_out if k not in state})
    changed = [k for k, digest in rebuilt.items() if digest != left_out[k]]
    if changed:
        raise InputError(
            f"checkpoint {source}: {len(changed)} frozen weight(s) rebuilt from the config differ from the ones "
            f"it was trained with (e.g. {changed[0]}); the pretrained source, the seed or a library version changed "
            "(a module built in Python needs lightning.seed_everything(cfg.seed) first, as every command does)"
        )
    return state
