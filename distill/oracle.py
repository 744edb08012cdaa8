"""The shapes oracle: a classifier of what a scene holds (distill/shapes.py), trained on the
generator's ground truth of every colour-shape pair, held-out ones included. It judges generated
images T2I-CompBench-style (count, colour, shape, spatial relation) and is never a search verifier:
search ranks by the verifier; the oracle only scores the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.shapes import COLOURS, SHAPES, SIZES, Scene, ShapesConfig, batch

ARRANGEMENTS = ("single", "horizontal", "vertical")
COLOUR_NAMES, CATEGORIES = list(COLOURS), ("count", "colour", "shape", "spatial")


@dataclass(frozen=True)
class OracleConfig:
    width: int = 32  # channels of the first convolution
    steps: int = 1500  # optimiser steps
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


class Oracle(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> logits of the arrangement and of each slot's colour, shape, size
    (slots in reading order: left then right, or top then bottom)."""

    def __init__(self, config: OracleConfig = OracleConfig()):
        super().__init__()
        width = config.width

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width),
                                      nn.Flatten(), nn.LazyLinear(128), nn.SiLU())
        self.heads = nn.ModuleDict({"arrangement": nn.Linear(128, len(ARRANGEMENTS))})
        for slot in (0, 1):
            for name, values in (("colour", COLOUR_NAMES), ("shape", SHAPES), ("size", SIZES)):
                self.heads[f"{name}{slot}"] = nn.Linear(128, len(values))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(image)
        return {name: head(h) for name, head in self.heads.items()}


def targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Ground-truth classes per head; the second slot of a one-object scene is -1 (ignored)."""
    out = {"arrangement": [], **{f"{n}{s}": [] for s in (0, 1) for n in ("colour", "shape", "size")}}
    for scene in scenes:
        arrangement, ordered = scene.slots()
        out["arrangement"].append(ARRANGEMENTS.index(arrangement))
        for slot in (0, 1):
            thing = ordered[slot] if slot < len(ordered) else None
            out[f"colour{slot}"].append(COLOUR_NAMES.index(thing.colour) if thing else -1)
            out[f"shape{slot}"].append(SHAPES.index(thing.shape) if thing else -1)
            out[f"size{slot}"].append(SIZES.index(thing.size) if thing else -1)
    return {name: torch.tensor(values) for name, values in out.items()}


def train_oracle(config: OracleConfig = OracleConfig(), shapes: ShapesConfig | None = None,
                 progress: bool = True) -> Oracle:
    """Fresh scenes every step, from both splits (the oracle must know the held-out pairs too)."""
    from tqdm import tqdm

    shapes = shapes or ShapesConfig()
    torch.manual_seed(config.seed)
    oracle = Oracle(config)
    oracle(torch.zeros(1, 3, shapes.size, shapes.size))  # materialise the lazy layer before the optimiser
    optimiser = torch.optim.AdamW(oracle.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    bar = tqdm(range(config.steps), desc="oracle", disable=not progress)
    for step in bar:
        seeds = range(step * config.batch_size, (step + 1) * config.batch_size)
        split = "test" if step % 4 == 3 else "train"
        images, scenes = batch(seeds, shapes, split)
        logits, truth = oracle(torch.from_numpy(images)), targets(scenes)
        loss = sum(loss_fn(logits[name], truth[name]) for name in logits)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for group in optimiser.param_groups:  # cosine decay to zero
            group["lr"] = config.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / config.steps))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return oracle.eval().requires_grad_(False)


def save_oracle(oracle: Oracle, config: OracleConfig, shapes: ShapesConfig, folder: str | Path) -> Path:
    """oracle.safetensors and oracle.json (its config and image size) in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(oracle.state_dict(), folder / "oracle.safetensors")
    (folder / "oracle.json").write_text(json.dumps({"config": asdict(config), "size": shapes.size}))
    return folder


def load_oracle(folder: str | Path) -> Oracle:
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "oracle.json").read_text())
    oracle = Oracle(OracleConfig(**meta["config"]))
    oracle(torch.zeros(1, 3, meta["size"], meta["size"]))  # materialise the lazy layer before loading
    oracle.load_state_dict(load_file(Path(folder) / "oracle.safetensors"))
    return oracle.eval().requires_grad_(False)


@torch.no_grad()
def judge(oracle: Oracle, images: np.ndarray, scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per image and category, 1 if the image shows what its caption says, NaN where the category does
    not apply (spatial for one object): count (one or two objects), colour and shape (of every object,
    in the place the caption puts it), spatial (the arrangement and which object is where)."""
    logits = oracle(torch.from_numpy(np.asarray(images, np.float32)))
    predicted = {name: value.argmax(1).numpy() for name, value in logits.items()}
    truth = {name: value.numpy() for name, value in targets(scenes).items()}
    out = {category: np.full(len(scenes), np.nan) for category in CATEGORIES}
    for i, scene in enumerate(scenes):
        slots = range(len(scene.things))
        count_ok = (predicted["arrangement"][i] == 0) == (truth["arrangement"][i] == 0)
        same = {name: all(predicted[f"{name}{s}"][i] == truth[f"{name}{s}"][i] for s in slots)
                for name in ("colour", "shape")}
        out["count"][i] = count_ok
        out["colour"][i] = count_ok and same["colour"]
        out["shape"][i] = count_ok and same["shape"]
        if scene.relation is not None:
            out["spatial"][i] = predicted["arrangement"][i] == truth["arrangement"][i] and same["colour"] \
                and same["shape"]
    return out


def accuracies(judged: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean per category over the images it applies to."""
    return {category: float(np.nanmean(values)) for category, values in judged.items()}
