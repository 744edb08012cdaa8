"""`flowmap bench search`: what Best-of-N noise search buys, at equal network evaluations (NFE;
docs/methods.md §8).

On held-out prompts, for every prompt and noise seed, four ways to spend a budget of B NFE:
(a) the teacher, K steps, one sample (B = one sample's cost C: K, or 2K with guidance);
(b) the teacher best-of-M by the verifier (B = M C);
(c) the student best-of-N (1 NFE each, guidance baked), then the teacher from the chosen noise (B = N + C);
(d) the student best-of-N alone (B = N).
Each chosen image is judged by an oracle that never ranks anything (distill/oracle.py for shapes, a
classifier trained apart for digits). Verifier calls are counted apart. Also: how well a noise's
student score predicts its teacher score (rank correlation over the same noises) and the 1-NFE
student's FD against the teacher's in the oracle's feature space. Confidence intervals: 95% bootstrap
over prompts (their seeds resampled with them). Writes docs/search.{md,json,png}.
"""

from __future__ import annotations

import functools
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowmap.reports import pyplot, save_figure, write_report

METHODS = {"a": "teacher, one sample", "b": "teacher best-of-M", "c": "student best-of-N, then teacher",
           "d": "student best-of-N"}


@dataclass
class SearchBenchConfig:
    shapes_runs: str = "runs/shapes"  # what `make models` trained: clip/, oracle/, teacher/, freeflow/
    digits_runs: str = "runs/digits"  # teacher/, verifier/, freeflow/
    tasks: tuple[str, ...] = ("shapes", "digits")
    prompts: int = 128  # held-out shapes prompts (digits: every class)
    seeds: int = 2  # noise sets per prompt (digits: per class, times 16)
    teacher_steps: int = 20  # K, Euler steps of one teacher sample
    budgets: tuple[int, ...] = (1, 2, 4, 8)  # in teacher samples' NFE
    shapes_guidance_scale: float = 3.0  # the shapes bundle's baked scale
    digits_guidance_scale: float = 1.0  # where class accuracy leaves room to improve
    fd_samples: int = 1024  # shapes scenes for the FD of student and teacher
    bootstrap: int = 1000
    batch_size: int = 256
    out: str = "docs/search"


@dataclass
class Task:
    """One model family's search problem: conditions per prompt, the verifier's score and the oracle's
    per-image judgement (category -> 1/0, NaN where a category does not apply)."""

    name: str
    teacher: object
    student: object
    guidance_scale: float
    prompts: list[str]
    conditions: torch.Tensor  # [P, ...]
    score: Callable[[torch.Tensor, np.ndarray], np.ndarray]  # images, prompt index -> verifier score
    judge: Callable[[torch.Tensor, np.ndarray], dict[str, np.ndarray]]  # images, prompt index -> judged
    seeds: int
    shape: tuple[int, ...]
    notes: dict = field(default_factory=dict)


def teacher_images(task: Task, noise: torch.Tensor, conditions: torch.Tensor,
                   config: SearchBenchConfig) -> torch.Tensor:
    from distill.evaluate import sample_teacher

    return sample_teacher(task.teacher, noise, conditions, task.guidance_scale, config.teacher_steps,
                          config.batch_size).clamp(-1, 1)


def student_images(task: Task, noise: torch.Tensor, conditions: torch.Tensor,
                   config: SearchBenchConfig) -> torch.Tensor:
    from distill.evaluate import sample_student

    return sample_student(task.student, noise, conditions, task.guidance_scale, 1,
                          config.batch_size).clamp(-1, 1)


def unit_noise(unit: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The search pool of one (prompt, seed) unit: noise j is the same for every method."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(10_000 + unit))


def judged_rows(task: Task, images: torch.Tensor, prompt: np.ndarray) -> np.ndarray:
    """[n, categories] of the oracle's 1/0/NaN judgements."""
    judged = task.judge(images, prompt)
    return np.stack([judged[c] for c in judged], axis=1)


def run_task(task: Task, config: SearchBenchConfig) -> dict:
    """Every method at every budget on one task; per-unit judgements kept for the intervals."""
    from tqdm import tqdm

    cost = config.teacher_steps * (1 if task.guidance_scale == 1.0 else 2)  # C: NFE of one teacher sample
    most_teacher, most_student = max(config.budgets), max(config.budgets) * cost
    units = [(p, s) for p in range(len(task.prompts)) for s in range(task.seeds)]
    categories = list(task.judge(torch.zeros((1, *task.shape)), np.zeros(1, int)))
    student_score = np.zeros((len(units), most_student))
    student_judged = np.zeros((len(units), most_student, len(categories)))
    teacher_score = np.zeros((len(units), most_teacher))
    teacher_judged = np.zeros((len(units), most_teacher, len(categories)))
    seconds = {"student": 0.0, "teacher": 0.0, "verifier": 0.0}
    group = max(1, config.batch_size // most_teacher)  # units whose teacher samples share a batch
    for first in tqdm(range(0, len(units), group), desc=f"search {task.name}"):
        chunk = range(first, min(first + group, len(units)))
        noise = torch.stack([unit_noise(u, most_student, task.shape) for u in chunk])
        prompt = np.array([[units[u][0]] * most_student for u in chunk])
        tick = time.perf_counter()
        images = student_images(task, noise.flatten(0, 1), task.conditions[prompt.ravel()], config)
        seconds["student"] += time.perf_counter() - tick
        tick = time.perf_counter()
        student_score[chunk] = task.score(images, prompt.ravel()).reshape(len(chunk), most_student)
        seconds["verifier"] += time.perf_counter() - tick
        student_judged[chunk] = judged_rows(task, images, prompt.ravel()).reshape(len(chunk), most_student, -1)
        tick = time.perf_counter()
        firsts = prompt[:, :most_teacher].ravel()
        images = teacher_images(task, noise[:, :most_teacher].flatten(0, 1), task.conditions[firsts], config)
        seconds["teacher"] += time.perf_counter() - tick
        teacher_score[chunk] = task.score(images, firsts).reshape(len(chunk), most_teacher)
        teacher_judged[chunk] = judged_rows(task, images, firsts).reshape(len(chunk), most_teacher, -1)
    # (c): the teacher from each budget's chosen noise, computed once per distinct noise
    finish: dict[tuple[int, int], np.ndarray] = {}
    wanted = sorted({(u, int(np.argmax(student_score[u, :(m - 1) * cost])))
                     for u in range(len(units)) for m in config.budgets if m > 1})
    missing = [(u, j) for u, j in wanted if j >= most_teacher]
    for start in range(0, len(missing), config.batch_size):
        chunk = missing[start:start + config.batch_size]
        noise = torch.stack([unit_noise(u, most_student, task.shape)[j] for u, j in chunk])
        prompt = np.array([units[u][0] for u, _ in chunk])
        images = teacher_images(task, noise, task.conditions[prompt], config)
        for (u, j), row in zip(chunk, judged_rows(task, images, prompt), strict=True):
            finish[(u, j)] = row
    for u, j in wanted:
        if j < most_teacher:
            finish[(u, j)] = teacher_judged[u, j]

    rows = []  # (method, budget multiple, NFE, verifier calls, per-unit judged [U, categories])
    rows.append(("a", 1, cost, 0, teacher_judged[:, 0]))
    for m in config.budgets:
        if m > 1:
            chosen = teacher_score[:, :m].argmax(1)
            rows.append(("b", m, m * cost, m, teacher_judged[np.arange(len(units)), chosen]))
            n = (m - 1) * cost
            rows.append(("c", m, m * cost, n, np.stack(
                [finish[(u, int(np.argmax(student_score[u, :n])))] for u in range(len(units))])))
    for n in sorted({1, *(m * cost for m in config.budgets)}):
        chosen = student_score[:, :n].argmax(1)
        rows.append(("d", n / cost, n, n if n > 1 else 0, student_judged[np.arange(len(units)), chosen]))

    prompts_of_units = np.array([p for p, _ in units])
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(task.prompts), len(task.prompts)) for _ in range(config.bootstrap)]
    baseline = rows[0][4]
    results = []
    for method, multiple, nfe, calls, judged in rows:
        entry = {"method": method, "label": METHODS[method], "budget": multiple, "nfe": nfe, "verifier_calls": calls}
        for k, category in enumerate(categories):
            entry[category] = interval(judged[:, k], prompts_of_units, draws)
            entry[f"{category}_gain"] = interval(judged[:, k] - baseline[:, k], prompts_of_units, draws)
        overall, overall_base = np.nanmean(judged, axis=1), np.nanmean(baseline, axis=1)
        entry["overall"] = interval(overall, prompts_of_units, draws)
        entry["overall_gain"] = interval(overall - overall_base, prompts_of_units, draws)
        results.append(entry)
    comparisons = []  # (c) against (b) at each budget, paired by unit
    for m in config.budgets:
        if m > 1:
            b = next(r[4] for r in rows if r[0] == "b" and r[1] == m)
            c = next(r[4] for r in rows if r[0] == "c" and r[1] == m)
            comparisons.append({"budget": m, "nfe": m * cost,
                                "overall_c_minus_b": interval(np.nanmean(c, 1) - np.nanmean(b, 1), prompts_of_units,
                                                              draws)})
    transfer = [spearman(student_score[u, :most_teacher], teacher_score[u]) for u in range(len(units))]
    return {"name": task.name, "guidance_scale": task.guidance_scale, "teacher_steps": config.teacher_steps,
            "teacher_sample_nfe": cost, "prompts": len(task.prompts), "seeds": task.seeds, "units": len(units),
            "categories": categories, "results": results, "c_vs_b": comparisons,
            "noise_transfer": {"spearman": interval(np.array(transfer), prompts_of_units, draws),
                               "noises_per_unit": most_teacher},
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "notes": task.notes}


def interval(values: np.ndarray, groups: np.ndarray, draws: list[np.ndarray]) -> dict:
    """Mean over units and a 95% bootstrap interval resampling groups (prompts) with their units."""
    per_group = np.array([np.nanmean(values[groups == g]) if np.any(~np.isnan(values[groups == g])) else np.nan
                          for g in range(groups.max() + 1)])
    with warnings.catch_warnings():  # a draw of only one-object prompts has no spatial mean: NaN, skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        means = [np.nanmean(per_group[d]) for d in draws]
    return {"mean": float(np.nanmean(values)), "lo": float(np.nanpercentile(means, 2.5)),
            "hi": float(np.nanpercentile(means, 97.5))}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def shapes_task(config: SearchBenchConfig) -> Task:
    """Held-out shapes prompts: the SANA-layout teacher, its FreeFlow student, the CLIP as verifier and
    the attribute oracle as judge."""
    import transformers

    from distill.clip import embed, token_ids
    from distill.models import load_student, load_teacher
    from distill.oracle import judge, load_oracle
    from distill.shapes import batch
    from distill.text import encode_prompts, load_conditioner

    runs = config.shapes_runs
    folder = f"{runs}/teacher/pipeline"
    _, scenes = batch(range(config.prompts), split="test")
    prompts = [scene.caption for scene in scenes]
    conditioner, tokenizers = load_conditioner(folder)
    encode = functools.partial(encode_prompts, conditioner, tokenizers)
    conditions = encode(prompts)
    clip = transformers.CLIPModel.from_pretrained(f"{runs}/clip").eval()
    ids = token_ids(transformers.AutoTokenizer.from_pretrained(f"{runs}/clip"), prompts)
    oracle = load_oracle(f"{runs}/oracle")

    @torch.no_grad()
    def score(images, prompt):
        out = []
        for start in range(0, len(images), 512):
            image, text = embed(clip, images[start:start + 512], ids[prompt[start:start + 512]])
            out.append((image * text).sum(-1))
        return torch.cat(out).numpy()

    task = Task("shapes", load_teacher(f"diffusers:{folder}"), load_student(f"{runs}/freeflow")[0],
                config.shapes_guidance_scale, prompts, conditions, score,
                lambda images, prompt: judge(oracle, images.numpy(), [scenes[p] for p in prompt]),
                config.seeds, (3, 32, 32))
    task.notes["fd"] = shapes_fd(task, oracle, encode, config)
    return task


def shapes_fd(task: Task, oracle, encode: Callable[[list[str]], torch.Tensor], config: SearchBenchConfig) -> dict:
    """FD in the oracle's feature space against real renders of held-out scenes: teacher (K steps) and
    the 1-NFE student on the same noise and prompts (`encode`: prompts to the teacher's conditions)."""
    from distill.evaluate import frechet_distance
    from distill.shapes import batch

    real, scenes = batch(range(50_000, 50_000 + config.fd_samples), split="test")
    conditions = encode([scene.caption for scene in scenes])
    noise = torch.randn((config.fd_samples, *task.shape), generator=torch.Generator().manual_seed(1))
    teacher = teacher_images(task, noise, conditions, config)
    student = student_images(task, noise, conditions, config)

    @torch.no_grad()
    def features(images):
        return torch.cat([oracle.features(chunk) for chunk in torch.as_tensor(images).split(512)]).numpy()

    reference = features(real)
    fd_teacher = frechet_distance(reference, features(teacher))
    fd_student = frechet_distance(reference, features(student))
    return {"teacher": fd_teacher, "student_1nfe": fd_student, "ratio": fd_student / fd_teacher,
            "samples": config.fd_samples, "features": "oracle penultimate layer (128)"}


def digits_oracle(data, seed: int = 1):
    """A classifier for judging digits, trained apart from the search verifier (another architecture,
    seed and split): an MLP on pixels; its held-out accuracy is reported beside it."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=generator)
    held, train = order[:300], order[300:]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(data.shape)), 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, len(data.classes)))
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = data.samples[train], data.labels[train]
    for _ in range(1500):
        pick = torch.randint(0, len(y), (128,), generator=generator)
        noisy = x[pick] + 0.1 * torch.randn(x[pick].shape, generator=generator)  # robust to sampling noise
        loss = torch.nn.functional.cross_entropy(net(noisy), y[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval().requires_grad_(False)
    accuracy = (net(data.samples[held]).argmax(1) == data.labels[held]).float().mean().item()
    return net, accuracy


def digits_task(config: SearchBenchConfig) -> Task:
    from distill.data import load_dataset
    from distill.models import load_student, load_teacher
    from distill.verifier import load_verifier

    runs = config.digits_runs
    data = load_dataset("digits")
    verifier = load_verifier(f"{runs}/verifier")
    oracle, oracle_accuracy = digits_oracle(data)
    labels = torch.arange(len(data.classes))

    @torch.no_grad()
    def score(images, prompt):
        return torch.log_softmax(verifier(images), -1)[torch.arange(len(images)), torch.as_tensor(prompt)].numpy()

    @torch.no_grad()
    def judge(images, prompt):
        return {"class": (oracle(images).argmax(1).numpy() == prompt).astype(float)}

    return Task("digits", load_teacher(f"{runs}/teacher"), load_student(f"{runs}/freeflow")[0],
                config.digits_guidance_scale, list(data.classes), labels, score, judge, config.seeds * 16,
                data.shape, notes={"oracle_held_out_accuracy": oracle_accuracy})


def run_search_bench(config: SearchBenchConfig) -> dict:
    """Run the tasks `config.tasks` names; a task it leaves out is kept from OUT.json's earlier run, if it has
    one (retraining one model family need not retrain the other to report on both)."""
    builders = {"shapes": shapes_task, "digits": digits_task}
    unknown = sorted(set(config.tasks) - set(builders))
    if unknown:
        raise ValueError(f"--tasks: no task {', '.join(unknown)}; the tasks are {', '.join(builders)}")
    torch.manual_seed(0)
    measured = {name: run_task(builders[name](config), config) for name in config.tasks}
    earlier = Path(config.out).with_suffix(".json")
    kept = {task["name"]: {**task, "kept_from_an_earlier_run": True}
            for task in (json.loads(earlier.read_text())["tasks"] if earlier.exists() else [])
            if task["name"] in builders and task["name"] not in measured}
    tasks = [measured.get(name) or kept[name] for name in builders if name in measured or name in kept]
    report = {"config": asdict(config), "tasks": tasks, "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "goals": goals(tasks)}
    write_report(report, config.out, plot, to_markdown)
    return report


def goals(tasks: list[dict]) -> dict:
    """The issue's targets, checked on the measured numbers."""
    out = {}
    for task in tasks:
        largest = max(r["budget"] for r in task["results"])
        best = {m: next(r for r in task["results"] if r["method"] == m and r["budget"] == largest) for m in "bc"}
        out[f"{task['name']}: (c) beats (b) at every budget"] = all(
            c["overall_c_minus_b"]["mean"] > 0 for c in task["c_vs_b"])
        if "spatial" in task["categories"]:
            gain = max(best["b"]["spatial_gain"]["mean"], best["c"]["spatial_gain"]["mean"])
            out[f"{task['name']}: search raises spatial accuracy by >= 0.05 over one sample"] = gain >= 0.05
        if "fd" in task["notes"]:
            out[f"{task['name']}: 1-NFE student FD <= 1.1x the teacher's"] = task["notes"]["fd"]["ratio"] <= 1.1
    return out


def plot(report: dict, path) -> None:
    plt = pyplot()
    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in "abcd":
            rows = [r for r in task["results"] if r["method"] == method]
            nfe = [r["nfe"] for r in rows]
            mean = [r["overall"]["mean"] for r in rows]
            lo, hi = [r["overall"]["lo"] for r in rows], [r["overall"]["hi"] for r in rows]
            ax.errorbar(nfe, mean, yerr=[np.subtract(mean, lo), np.subtract(hi, mean)], marker="o", capsize=3,
                        label=f"({method}) {METHODS[method]}")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per image (NFE)")
        ax.set_ylabel("oracle accuracy (mean of categories)")
        ax.set_title(f"{task['name']}, guidance {task['guidance_scale']:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def cell(value: dict) -> str:
    return f"{value['mean']:.3f} [{value['lo']:.3f}, {value['hi']:.3f}]"


def to_markdown(report: dict, plot_name: str) -> str:
    config = report["config"]
    lines = ["# What Best-of-N search buys", "",
             "Written by `flowmap bench search` on the machine it ran on "
             f"({report['torch_threads']} torch threads). Each image is judged by an oracle that never ranks "
             "anything; the verifier ranks. NFE counts network evaluations per image: a teacher step with "
             "guidance is two, a student jump with its guidance baked is one; verifier calls are counted "
             "apart. Brackets: 95% bootstrap intervals over prompts (with their seeds). Methods: (a) "
             f"teacher, {config['teacher_steps']} Euler steps, one sample; (b) teacher best-of-M; (c) student "
             "best-of-N, then the teacher from the chosen noise; (d) student best-of-N alone.", "",
             f"![accuracy against NFE]({plot_name})", ""]
    for task in report["tasks"]:
        categories = task["categories"]
        earlier = (" Kept from an earlier run of this benchmark: this run measured "
                   f"{', '.join(config['tasks'])} only.") if task.get("kept_from_an_earlier_run") else ""
        lines += [f"## {task['name']}", "",
                  f"{task['prompts']} {'held-out prompts' if 'spatial' in categories else 'classes'} x "
                  f"{task['seeds']} seeds = {task['units']} searches; guidance "
                  f"{task['guidance_scale']:g}; one teacher sample = {task['teacher_sample_nfe']} NFE.{earlier}", "",
                  "| method | NFE | verifier calls | overall | " + " | ".join(categories) + " | overall gain on (a) |",
                  "|---|---:|---:|---|" + "---|" * len(categories) + "---|"]
        for r in task["results"]:
            label = f"({r['method']}) {r['label']}"
            lines.append(f"| {label} | {r['nfe']:g} | {r['verifier_calls']} | {cell(r['overall'])} | "
                         + " | ".join(cell(r[c]) for c in categories) + f" | {cell(r['overall_gain'])} |")
        lines += ["", "(c) minus (b) at equal NFE, paired by prompt and seed: "
                  + "; ".join(f"{c['nfe']} NFE {cell(c['overall_c_minus_b'])}" for c in task["c_vs_b"]) + ".", ""]
        transfer = task["noise_transfer"]
        lines.append(f"Noise transfer: Spearman rank correlation between the student's and the teacher's "
                     f"verifier score of the same {transfer['noises_per_unit']} noises, mean over searches: "
                     f"{cell(transfer['spearman'])}.")
        if "fd" in task["notes"]:
            fd = task["notes"]["fd"]
            lines.append(f"\nFD against real held-out renders ({fd['samples']} samples, {fd['features']}): teacher "
                         f"{fd['teacher']:.2f}, 1-NFE student {fd['student_1nfe']:.2f} ({fd['ratio']:.2f}x).")
        if "oracle_held_out_accuracy" in task["notes"]:
            lines.append(f"\nThe digits oracle (an MLP trained apart from the verifier) classifies held-out real "
                         f"digits at {task['notes']['oracle_held_out_accuracy']:.3f}.")
        lines.append(f"\nSeconds spent: {task['seconds']}.")
        lines.append("")
    lines += ["## Goals", "", "| goal | met |", "|---|---|"]
    lines += [f"| {goal} | {'yes' if met else 'no'} |" for goal, met in report["goals"].items()]
    return "\n".join(lines) + "\n"
