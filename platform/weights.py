"""Weights on disk: a state dict's bytes, their hash (the version of an FM or a VM), and loading
them back with that hash checked.

Neutral ground for every checkpoint: the FM (`fm.checkpoint`), the VM (`training.checkpoint`) and
the store's compressor all use it, and none of them imports another's package for it. The version
is the sha256 prefix of `model.pt`; loading re-hashes the bytes and refuses a file that does not
match, and `torch.load(weights_only=True)` never runs code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch

from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.location import as_path
from loopfm.rundir import committed

MODEL_FILE = "model.pt"


def state_bytes(state: torch.nn.Module | dict) -> bytes:
    """A module's (or a state dict's) tensors on CPU, serialized: the bytes a version hashes."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.getvalue()


def model_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def verified_bytes(directory: Path, version: str) -> bytes:
    """`model.pt` of `directory`, refused unless its hash is `version`."""
    path = committed(as_path(directory)) / MODEL_FILE
    if not path.is_file():
        raise MissingInputError(f"no weights at {path}")
    data = path.read_bytes()
    if model_hash(data) != version:
        raise VersionMismatchError(
            f"{path} does not match its manifest (version {version}, file hashes to {model_hash(data)}); "
            "the checkpoint was modified or is incomplete"
        )
    return data


def verified_state(directory: Path, version: str) -> dict:
    """`model.pt` of `directory` as a state dict (`torch.load(weights_only=True)`), hash checked."""
    return load_weights(io.BytesIO(verified_bytes(directory, version)), f"{directory}/{MODEL_FILE}")


def load_weights(source, name) -> dict:
    """`torch.load(weights_only=True)`: a file that is not plain tensors (a pickle that would run
    code, say) is refused with an error naming it, not a traceback from the unpickler."""
    try:
        return torch.load(source, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise VersionMismatchError(f"{name} is not a weights-only torch file ({type(err).__name__}: it holds more "
                                   "than tensors, e.g. objects that would run code when unpickled); refused") from None
