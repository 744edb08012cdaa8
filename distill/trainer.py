"""The one training loop shared by the teacher, the verifier and every distillation method.

A method is an object with `trainable` (name -> module, one Adam each), `ema_name` (the module
whose EMA is the result) and `losses(generator, logs)`, a generator of (module name, loss) pairs:
the loop backpropagates each loss and steps that module's optimiser before asking for the next,
so a method can interleave updates (a fake flow before the student, k critic steps, ...).
Optionally, `state` (name -> module) is checkpointed but not optimised (FSF-DMD's fake-side EMA),
and the loop sets `method.step` before each call.

Under torchrun (WORLD_SIZE > 1) the loop is data-parallel: each rank draws its share of the global
batch from its own seed, gradients are averaged across ranks after every backward (what DDP's
reducer does; done explicitly because the objectives run several forwards and JVPs per backward,
which the DDP wrapper cannot synchronise), and rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from distill.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, restore, save_checkpoint


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 256
    lr: float = 3e-4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    max_minutes: float | None = None  # stop early (and checkpoint) after this much wall time
    device: str = "cpu"


class Method(Protocol):
    trainable: dict[str, nn.Module]
    ema_name: str

    def losses(self, generator: torch.Generator, logs: dict[str, float]) -> Iterator[tuple[str, torch.Tensor]]:
        ...


@contextmanager
def seeded(seed: int):
    """Seed torch's global RNG inside the block only (weight initialisation), restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def world_size() -> int:
    """Processes in this run (torchrun's WORLD_SIZE; 1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_batch_size(global_batch: int) -> int:
    """This rank's share of the global batch."""
    world = world_size()
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} must be divisible by the {world} processes of this run")
    return global_batch // world


def rank_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


def join_process_group(device: str) -> tuple[int, int]:
    """(rank, world) after joining torchrun's process group (gloo on CPU, nccl on CUDA)."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def average_gradients(module: nn.Module, world: int) -> None:
    """All-reduce and average every gradient of `module` across ranks."""
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p, 1 - decay)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(method: Method, run_dir: str | Path, meta: dict, cfg: TrainConfig, resume: bool = True,
          progress: bool = True) -> dict:
    """Train `method` into `run_dir`, resuming from its checkpoint if one is there.

    `meta` (kind, configs) is stored with every checkpoint. Returns a summary with the step reached,
    seconds per step and peak memory; the same figures go to `run_dir/summary.json`.
    """
    run_dir = Path(run_dir)
    rank, world = join_process_group(cfg.device)
    lead = rank == 0  # writes checkpoints, logs and the progress bar
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if world > 1 and cfg.device == "cuda"
                          else cfg.device)
    for module in method.trainable.values():
        module.to(device).train()
        if world > 1:  # every rank starts from rank 0's weights
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)
    for module in getattr(method, "state", {}).values():
        module.to(device)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=cfg.lr) for name, m in method.trainable.items()}
    ema = copy.deepcopy(method.trainable[method.ema_name]).eval().requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(rank_seed(cfg.seed, rank))
    modules = {**method.trainable, "ema": ema, **getattr(method, "state", {})}
    meta = {**meta, "train": asdict(cfg), "world_size": world}
    step = 0
    if resume and has_checkpoint(run_dir):
        old_meta, tensors = load_checkpoint(run_dir)
        if old_meta.get("kind") != meta.get("kind"):
            raise CheckpointError(f"{run_dir} holds a {old_meta.get('kind')!r} run; refusing to resume it as "
                                  f"{meta.get('kind')!r} (use another --out)")
        restore(old_meta, tensors, modules, optimizers, generator, rank)
        step = old_meta["step"]

    def checkpoint() -> None:
        states = [generator.get_state()]
        if world > 1:  # every rank's RNG goes into rank 0's checkpoint, so resuming is exact on all ranks
            states = [None] * world
            dist.all_gather_object(states, generator.get_state())
        if lead:
            save_checkpoint(run_dir, {**meta, "step": step}, modules, optimizers, rng_states=states)

    log_file = (run_dir / "log.jsonl").open("a") if lead else None  # noqa: SIM115 (closed in finally)
    running: dict[str, float] = {}
    start, compute_seconds, first_step = time.perf_counter(), 0.0, step
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and lead), desc=meta.get("kind", "train"),
               dynamic_ncols=True)
    try:
        while step < cfg.steps:
            if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
                break
            tick = time.perf_counter()
            logs: dict[str, float] = {}
            method.step = step
            for name, loss in method.losses(generator, logs):
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    average_gradients(method.trainable[name], world)
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(method.trainable[name].parameters(), cfg.grad_clip)
                optimizers[name].step()
            ema_update(ema, method.trainable[method.ema_name], cfg.ema_decay)
            compute_seconds += time.perf_counter() - tick
            step += 1
            for key, value in logs.items():
                running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
                if log_file:
                    log_file.write(json.dumps({"step": step, "seconds": round(time.perf_counter() - start, 3),
                                               **logs}) + "\n")
                    log_file.flush()
            if step % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
        if log_file:
            log_file.close()
    checkpoint()
    steps_run = step - first_step
    summary = {
        "kind": meta.get("kind"),
        "world_size": world,
        "step": step,
        "steps_this_run": steps_run,
        "seconds": round(time.perf_counter() - start, 2),
        "sec_per_step": round(compute_seconds / steps_run, 4) if steps_run else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "final": {k: round(v, 6) for k, v in running.items()},
    }
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
    return summary
