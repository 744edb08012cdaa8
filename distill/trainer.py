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
import signal
import threading
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

from distill.checkpoint import (
    CheckpointError,
    checkpoint_meta,
    has_checkpoint,
    load_checkpoint,
    restore,
    save_checkpoint,
)

STOPPED_EARLY = 3  # the exit status of a training command whose run stopped before its last step (--max-minutes)


@dataclass
class TrainConfig:
    steps: int = 4000  # optimiser steps in all (a resumed run continues to this count)
    batch_size: int = 256  # global: split across ranks under torchrun
    lr: float = 3e-4  # Adam's learning rate
    ema_decay: float = 0.999  # the result is this EMA of the weights (0 = the live weights)
    grad_clip: float = 1.0  # gradient-norm clip per module (0 = off)
    seed: int = 0  # weights, batches and noise all follow from it
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    log_every: int = 50  # steps between log.jsonl lines and progress-bar updates
    max_minutes: float | None = None  # stop early (and checkpoint) after this much wall time
    # recompute each transformer block's activations in the backward pass instead of keeping them: less memory
    # for a real-size model, one more forward of the blocks
    gradient_checkpointing: bool = False
    device: str = "cpu"  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be above 0, got {self.lr}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():  # before any model loads
            raise ValueError(f"--device {self.device}: this torch ({torch.__version__}) sees no CUDA GPU; train with "
                             "--device cpu, or install a CUDA build of torch on a machine with one")


@dataclass
class Setup:
    """What every distillation method is built from: one signature, `Method(setup)`, for all of them."""

    student: nn.Module
    teacher: nn.Module | None  # None for a teacher-free run (fsf-dmd --self-teacher)
    config: object  # the method's own config dataclass
    data: object | None = None  # a distill.data.Dataset, for the methods that use data
    batch_size: int = 256  # this rank's share of the batch
    device: str = "cpu"

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample data shape, as the student sees it."""
        return tuple(self.student.config.shape)


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
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p, 1 - decay)


# What decides the shapes of a run's tensors: a change here makes its checkpoint unloadable.
SHAPE_KEYS = ("net", "verifier")


def checkpointed_networks(modules) -> int:
    """Turn on gradient checkpointing in every network among `modules` that has it (ours and diffusers'
    transformers); returns how many. None having it is an error: the flag would change nothing."""
    networks = [network for module in modules for network in module.modules()
                if hasattr(network, "enable_gradient_checkpointing")]
    if not networks:
        raise ValueError("--gradient-checkpointing: none of this run's networks has blocks to recompute (a "
                         "verifier's classifier has none); train it without the flag")
    for network in networks:
        network.enable_gradient_checkpointing()
    return len(networks)


def same_setting(name: str, before, now) -> bool:
    """Equal settings; a folder (`path`) named two ways, relative and absolute, is one folder."""
    if name == "path" and isinstance(before, str) and isinstance(now, str):
        return os.path.realpath(before) == os.path.realpath(now)
    return before == now


def shape_differences(old: dict, new: dict) -> list[str]:
    """'net.arch: checkpoint 'mlp', now 'dit'' for every shape-deciding setting that differs."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # as stored: tuples become lists
    changed = []
    for key in SHAPE_KEYS:
        before, now = old.get(key) or {}, new.get(key) or {}
        for name in sorted(set(before) | set(now)):
            if not same_setting(name, before.get(name), now.get(name)):
                changed.append(f"{key}.{name}: checkpoint {before.get(name)!r}, now {now.get(name)!r}")
    before, now = (old.get("data") or {}).get("shape"), (new.get("data") or {}).get("shape")
    if before != now:
        changed.append(f"data shape: checkpoint {before}, now {now}")
    return changed


ESTIMATE_AFTER_STEPS = 20  # the first steps are timed and an estimate of the whole run is printed


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_log(path: Path, step: int):
    """The run's log.jsonl, for appending after `step`: a fresh run's starts empty, and a resumed run's loses the
    lines logged after its checkpoint (those steps are trained again)."""
    kept = []
    if step and path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
    log = path.open("w")  # noqa: SIM115 (the trainer closes it)
    log.writelines(kept)
    return log


class StopOnInterrupt:
    """Ctrl-C (SIGINT) asks the trainer to stop after the step under way, so the checkpoint it then writes
    resumes exactly; a second Ctrl-C stops at once. Only the main thread can take the signal: elsewhere,
    Ctrl-C keeps Python's own behaviour."""

    def __init__(self):
        self._event, self._previous = threading.Event(), None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()
        tqdm.write("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(method: Method, run_dir: str | Path, meta: dict, config: TrainConfig, resume: bool = True,
          progress: bool = True) -> dict:
    """Train `method` into `run_dir`, resuming from its checkpoint if one is there.

    `meta` (kind, configs) is stored with every checkpoint. Returns a summary with the step reached,
    seconds per step and peak memory; the same figures go to `run_dir/summary.json`.
    """
    run_dir = Path(run_dir)
    rank, world = join_process_group(config.device)
    lead = rank == 0  # writes checkpoints, logs and the progress bar
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if world > 1 and config.device == "cuda"
                          else config.device)
    for module in method.trainable.values():
        module.to(device).train()
        if world > 1:  # every rank starts from rank 0's weights
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)
    for module in getattr(method, "state", {}).values():
        module.to(device)
    checkpointed = checkpointed_networks(method.trainable.values()) if config.gradient_checkpointing else 0
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=config.lr) for name, m in method.trainable.items()}
    ema = copy.deepcopy(method.trainable[method.ema_name]).eval().requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(rank_seed(config.seed, rank))
    modules = {**method.trainable, "ema": ema, **getattr(method, "state", {})}
    meta = {**meta, "train": asdict(config), "world_size": world}
    step = 0
    old_meta = checkpoint_meta(run_dir) if has_checkpoint(run_dir) else None
    if old_meta is not None and old_meta.get("kind") != meta.get("kind"):  # a teacher is not overwritten by accident
        raise CheckpointError(f"{run_dir} holds a {old_meta.get('kind')!r} run; refusing to "
                              f"{'resume' if resume else 'overwrite'} it as {meta.get('kind')!r} (use another --out)")
    if resume and old_meta is not None and old_meta.get("method") != meta.get("method"):
        raise CheckpointError(f"{run_dir} holds a {old_meta.get('method')} run; refusing to resume it with "
                              f"--method {meta.get('method')} (use another --out, or --no-resume to start over)")
    if resume and old_meta is not None and old_meta.get("prompts_sha256") not in (None, meta.get("prompts_sha256")):
        raise CheckpointError(f"{run_dir} was trained on other prompts; resume it with the same --prompts file, or "
                              "start over with --no-resume or another --out")
    if resume and old_meta is not None:
        tensors = load_checkpoint(run_dir)[1]
        changed = shape_differences(old_meta, meta)
        if changed:
            raise CheckpointError(f"{run_dir} holds a run whose networks have another shape, so it cannot be resumed "
                                  f"with these settings: {'; '.join(changed)}. Resume with the checkpoint's settings, "
                                  "or start over with --no-resume or another --out")
        restore(old_meta, tensors, modules, optimizers, generator, rank)
        step = old_meta["step"]
        if lead and progress:  # a finished run resumed does nothing: say so, not only "steps_this_run: 0"
            left = f"training on to step {config.steps}" if step < config.steps else \
                f"it has reached --steps {config.steps}: nothing to train (raise --steps, or --no-resume to start over)"
            print(f"resuming {run_dir} at step {step}: {left}", flush=True)

    def checkpoint() -> None:
        states = [generator.get_state()]
        if world > 1:  # every rank's RNG goes into rank 0's checkpoint, so resuming is exact on all ranks
            states = [None] * world
            dist.all_gather_object(states, generator.get_state())
        if lead:
            save_checkpoint(run_dir, {**meta, "step": step}, modules, optimizers, rng_states=states)

    log_file = open_log(run_dir / "log.jsonl", step) if lead else None
    interrupted = StopOnInterrupt() if world == 1 else None  # ranks must stop at one step together
    running: dict[str, float] = {}
    start, compute_seconds, first_step = time.perf_counter(), 0.0, step
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and lead), desc=meta.get("kind", "train"),
               dynamic_ncols=True)
    try:
        while step < config.steps:
            if config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes:
                if progress and lead:
                    tqdm.write(f"stopping at step {step} of {config.steps}: --max-minutes {config.max_minutes:g} "
                               "passed (rerun to train on)")
                break
            if interrupted is not None and interrupted.is_set():
                break
            tick = time.perf_counter()
            logs: dict[str, float] = {}
            method.step = step
            for name, loss in method.losses(generator, logs):
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    average_gradients(method.trainable[name], world)
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(method.trainable[name].parameters(), config.grad_clip)
                optimizers[name].step()
            ema_update(ema, method.trainable[method.ema_name], config.ema_decay)
            compute_seconds += time.perf_counter() - tick
            step += 1
            for key, value in logs.items():
                running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
            bar.update(1)
            if step - first_step == ESTIMATE_AFTER_STEPS and progress and lead and step < config.steps:
                per_step = compute_seconds / ESTIMATE_AFTER_STEPS
                left = config.steps - step
                tqdm.write(f"{meta.get('kind', 'train')}: {per_step:.3g} s/step, so about "
                           f"{duration(per_step * left)} for the remaining {left} steps")
            if step % config.log_every == 0 or step == config.steps:
                bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
                if log_file:
                    log_file.write(json.dumps({"step": step, "seconds": round(time.perf_counter() - start, 3),
                                               **logs}) + "\n")
                    log_file.flush()
            if step % config.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if interrupted is not None:
            interrupted.restore()
    checkpoint()
    if interrupted is not None and interrupted.is_set():
        raise KeyboardInterrupt(f"interrupted at step {step}; its checkpoint is saved in {run_dir}: the same "
                                "command resumes it")
    steps_run = step - first_step
    summary = {
        "kind": meta.get("kind"),
        "world_size": world,
        "step": step,
        "finished": step >= config.steps,  # False where --max-minutes stopped it first
        "steps_this_run": steps_run,
        "seconds": round(time.perf_counter() - start, 2),
        "sec_per_step": round(compute_seconds / steps_run, 4) if steps_run else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "final": {k: round(v, 6) for k, v in running.items()},
        "checkpointed_networks": checkpointed,  # networks whose blocks recompute activations (gradient_checkpointing)
    }
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
    return summary
