"""Resumable runs: after every round the server writes all it needs to continue, atomically.

<run folder>/checkpoint/
  round-<k>.safetensors   the global model's state and the server optimizer's moments after round k
  latest.json             the last complete round k and the rest of the server's state: the learner mask, the
                          sampler's and the availability draws' generator states, the simulated clock, the byte
                          totals, the history of rounds and the busy intervals

Each file is written under a temporary name and renamed into place, tensors first and `latest.json` last, so a
run killed at any instant leaves either the previous complete round or the new one, never half of one.
`fedfar run --resume <run folder>` continues from `latest.json`. Clients need nothing: their seeds follow from
(seed, partition, round), and their per-worker caches rebuild the same pristine model.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DIR = "checkpoint"


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]      # the global model's state dict
    optimizer: dict[str, torch.Tensor]  # ServerOptimizer.state_dict()
    meta: dict[str, Any]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def save(folder: Path, rnd: int, state: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
         meta: dict[str, Any]) -> None:
    """Write round `rnd`'s checkpoint into `folder`/checkpoint and drop the previous round's tensors."""
    from safetensors.torch import save

    d = Path(folder) / DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {**{f"model/{k}": v.detach().contiguous() for k, v in state.items()},
               **{f"server-opt/{k}": v.contiguous() for k, v in optimizer.items()}}
    name = f"round-{rnd:04d}.safetensors"
    _atomic_write(d / name, lambda fh: fh.write(save(tensors)))
    body = json.dumps({"round": rnd, "tensors": name, **meta}).encode()
    _atomic_write(d / "latest.json", lambda fh: fh.write(body))
    for old in d.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def latest(folder: Path) -> dict[str, Any] | None:
    """`latest.json` of `folder`'s checkpoint: the last complete round and the server's state (None: none)."""
    path = Path(folder) / DIR / "latest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def latest_round(folder: Path) -> int | None:
    """The last complete round checkpointed in `folder` (None: none)."""
    meta = latest(folder)
    return meta["round"] if meta else None


def load(folder: Path) -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(folder) / DIR / "latest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint ({path} is missing): the run stopped before its first "
                                "round was saved, or it is not a fedfar run folder; start the run again instead")
    meta = json.loads(path.read_text())
    tensors = load_file(Path(folder) / DIR / meta.pop("tensors"))
    split = {"model": {}, "server-opt": {}}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        split[kind][name] = t
    return Checkpoint(meta.pop("round"), split["model"], split["server-opt"], meta)
