"""Checkpoints: one safetensors file of every tensor (models, EMA, optimiser state, RNG) plus a JSON.

A run directory holds `checkpoint.safetensors` and `checkpoint.json`; the JSON carries the config
needed to rebuild the models, so a checkpoint is self-describing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, of the wrong kind, or does not fit the model."""


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"opt.{name}.{index}.{key}"] = torch.as_tensor(value).detach().clone()
    return tensors, state["param_groups"]


def _unflatten_optimizer(name: str, tensors: dict, param_groups: list) -> dict:
    prefix = f"opt.{name}."
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(run_dir: str | Path, meta: dict, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    generator: torch.Generator | None = None, rng_states: list | None = None) -> Path:
    """Write every module's state, optimiser state and RNG state atomically into `run_dir`.

    `rng_states` holds one generator state per rank of a data-parallel run (rank 0 first).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    meta = dict(meta)
    if optimizers:
        groups = {}
        for name, optimizer in optimizers.items():
            opt_tensors, groups[name] = _flatten_optimizer(name, optimizer)
            tensors.update(opt_tensors)
        meta["optimizers"] = groups
    if generator is not None:
        rng_states = [generator.get_state()]
    for rank, state in enumerate(rng_states or []):
        tensors["rng.torch" if rank == 0 else f"rng.torch.rank{rank}"] = state
    tmp_tensors, tmp_meta = run_dir / (TENSORS + ".tmp"), run_dir / (META + ".tmp")
    save_file(tensors, str(tmp_tensors))
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_tensors, run_dir / TENSORS)
    os.replace(tmp_meta, run_dir / META)
    return run_dir


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / TENSORS).is_file() and (Path(run_dir) / META).is_file()


def checkpoint_meta(run_dir: str | Path) -> dict:
    """A checkpoint's meta (kind, configs, step) alone, without its tensors."""
    run_dir = Path(run_dir)
    if not has_checkpoint(run_dir):
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {TENSORS} and {META})")
    return json.loads((run_dir / META).read_text())


def load_checkpoint(run_dir: str | Path, kind: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (meta, tensors); with `kind`, refuse a checkpoint of another kind (teacher, student, ...)."""
    run_dir = Path(run_dir)
    meta = checkpoint_meta(run_dir)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{run_dir} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    return meta, load_file(str(run_dir / TENSORS))


def module_state(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The state dict stored under `name.`."""
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint holds no module {name!r}")
    return state


def restore(meta: dict, tensors: dict, modules: dict[str, torch.nn.Module],
            optimizers: dict[str, torch.optim.Optimizer] | None = None,
            generator: torch.Generator | None = None, rank: int = 0) -> None:
    """Load modules, optimisers and (this rank's) RNG state written by `save_checkpoint`."""
    for name, module in modules.items():
        module.load_state_dict(module_state(tensors, name))
    for name, optimizer in (optimizers or {}).items():
        optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta["optimizers"][name]))
    key = "rng.torch" if rank == 0 else f"rng.torch.rank{rank}"
    if generator is not None and key in tensors:
        generator.set_state(tensors[key])
