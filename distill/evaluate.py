"""Evaluation (docs/methods.md §7): FD in pixels and verifier features, precision/recall, class accuracy,
and the student-teacher alignment from shared noise."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.data import Dataset
from distill.flow import euler_sample, flow_map_sample, guided_velocity, heun_sample, null_condition


@dataclass
class EvalConfig:
    guidance_scale: float = 1.5  # guidance scale of every sample
    teacher_steps: tuple[int, ...] = (1, 2, 4, 8, 100)  # Euler step counts of the teacher to score
    student_steps: tuple[int, ...] = (1, 2)  # flow-map jumps of the student to score
    reference_steps: int = 100  # the teacher run that alignment RMSE is measured against
    seed: int = 1234  # of the noise every model starts from (shared, so alignment compares like for like)
    batch_size: int = 1024  # samples per forward pass
    k: int = 3  # k-NN for precision / recall
    sampler: str = "euler"  # the teacher's sampler: "euler" or "heun"
    extra: dict = field(default_factory=dict)  # recorded with the results


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two [N, D] sample sets, in float64.

    tr sqrt(Σa Σb) is computed as the trace of sqrt(Σa^½ Σb Σa^½), which stays exact when the
    covariances are singular (digits have corner pixels that are always background).
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def _kth_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # +1 skips the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN precision (fakes inside the real manifold) and recall (reals inside the fake manifold)."""
    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    real_radius, fake_radius = _kth_distance(real_t, k), _kth_distance(fake_t, k)
    cross = torch.cdist(fake_t, real_t)  # [n_fake, n_real]
    precision = (cross <= real_radius[None]).any(1).double().mean().item()
    recall = (fake_radius[None] >= cross.T).any(1).double().mean().item()
    return precision, recall


@torch.no_grad()
def sample_teacher(teacher, eps, label, guidance_scale: float, steps: int, batch_size: int = 1024,
                   sampler: str = "euler") -> torch.Tensor:
    solve = {"euler": euler_sample, "heun": heun_sample}[sampler]
    out = []
    for start in range(0, eps.shape[0], batch_size):
        chunk_label = label[start:start + batch_size]
        velocity = lambda x, t, c=chunk_label: guided_velocity(teacher.velocity, x, t, c, guidance_scale,
                                                               null_condition(teacher, c))
        out.append(solve(velocity, eps[start:start + batch_size], steps))
    return torch.cat(out)


@torch.no_grad()
def sample_student(student, eps, label, guidance_scale: float, steps: int, batch_size: int = 1024) -> torch.Tensor:
    out = []
    for start in range(0, eps.shape[0], batch_size):
        chunk_label = label[start:start + batch_size]
        w = torch.full((chunk_label.shape[0],), float(guidance_scale))
        out.append(flow_map_sample(student.average_velocity, eps[start:start + batch_size], steps, chunk_label, w))
    return torch.cat(out)


class Scorer:
    """Reference statistics of the real data, computed once, against which sample sets are scored."""

    def __init__(self, data: Dataset, verifier, k: int = 3):
        self.data, self.verifier, self.k = data, verifier.eval(), k
        self.real_pixels = data.samples.flatten(1).numpy()
        self.real_features = self._features(data.samples)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.verifier.features(c) for c in x.split(1024)]).numpy()

    @torch.no_grad()
    def score(self, samples: torch.Tensor, label: torch.Tensor) -> dict:
        samples = samples.clamp(-1, 1)
        features = self._features(samples)
        logits = torch.cat([self.verifier(c) for c in samples.split(1024)])
        precision, recall = precision_recall(self.real_features, features, self.k)
        return {
            "fd_pixels": frechet_distance(self.real_pixels, samples.flatten(1).numpy()),
            "fd_features": frechet_distance(self.real_features, features),
            "precision": precision,
            "recall": recall,
            "class_accuracy": (logits.argmax(-1) == label).float().mean().item(),
        }


def evaluate(teacher, student, verifier, data: Dataset, config: EvalConfig, progress: bool = True) -> dict:
    """Score the teacher at every `teacher_steps` and the student at every `student_steps`.

    All runs share one set of noise and labels (the data's own labels, so class frequencies match),
    which is what makes the alignment RMSE against the teacher's reference run meaningful.
    """
    generator = torch.Generator().manual_seed(config.seed)
    eps = torch.randn((len(data), *data.shape), generator=generator)
    label = data.labels.clone()
    scorer = Scorer(data, verifier, config.k)
    runs = [("teacher", s) for s in sorted(set(config.teacher_steps) | {config.reference_steps})]
    runs += [("student", s) for s in config.student_steps] if student is not None else []
    rows, reference = [], None
    for model, steps in runs:
        tick = time.perf_counter()
        if model == "teacher":
            samples = sample_teacher(teacher, eps, label, config.guidance_scale, steps, config.batch_size,
                                     config.sampler)
        else:
            samples = sample_student(student, eps, label, config.guidance_scale, steps, config.batch_size)
        seconds = time.perf_counter() - tick
        if model == "teacher" and steps == config.reference_steps:
            reference = samples
        row = {"model": model, "steps": steps, "guidance_scale": config.guidance_scale, **scorer.score(samples, label),
               "sample_seconds": round(seconds, 3), "_samples": samples}
        rows.append(row)
        if progress:
            print(f"  {model:8s} {steps:4d} steps  FD {row['fd_pixels']:.4f}  ({seconds:.1f}s)", flush=True)
    for row in rows:
        samples = row.pop("_samples")
        row["alignment_rmse"] = (samples - reference).pow(2).mean().sqrt().item()
    rows = [r for r in rows if r["model"] == "student" or r["steps"] in config.teacher_steps]
    ref_fd = next(r["fd_pixels"] for r in rows if r["model"] == "teacher" and r["steps"] == config.reference_steps) \
        if config.reference_steps in config.teacher_steps else None
    for row in rows:
        row["fd_vs_teacher_ref"] = row["fd_pixels"] / ref_fd if ref_fd else None
    return {"config": asdict(config), "num_samples": len(data), "dataset": data.name, "rows": rows}


def to_markdown(result: dict) -> str:
    """A results table: one row per (model, steps)."""
    ref = result["config"]["reference_steps"]
    lines = [
        f"Guidance w = {result['config']['guidance_scale']}, {result['num_samples']} samples against "
        f"the {result['dataset']} data; alignment = RMSE to the teacher's {ref}-step sample from the same noise.",
        "",
        "| model | steps | FD pixels | FD / teacher@" + str(ref) + " | FD features | precision | recall "
        "| class acc. | alignment RMSE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['fd_vs_teacher_ref']:.3f}" if r.get("fd_vs_teacher_ref") is not None else "-"
        lines.append(f"| {r['model']} | {r['steps']} | {r['fd_pixels']:.4f} | {ratio} | {r['fd_features']:.3f} "
                     f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} "
                     f"| {r['alignment_rmse']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write `<out>.md` and `<out>.json`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    md.write_text("# Evaluation\n\n" + to_markdown(result))
    js.write_text(json.dumps(result, indent=2))
    return md, js
