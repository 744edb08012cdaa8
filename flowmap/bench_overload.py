"""`flowmap bench overload`: what the server delivers when more clients come than it can serve.

Capacity is measured first (multi-step student requests at a concurrency the server keeps up
with); then four times as many clients arrive against the same bounded queue, once honouring
Retry-After as OpenAI's client does and once retrying at once, and once with teacher requests mixed
in. Goodput (images/s of 200 answers) is compared with the capacity, every answer is checked to be
200 or 429 with a retry hint, and the 200s' p99 against the request deadline.
Writes docs/overload.md, .json and .png."""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from flowmap.bench_serve import ServerProcess, cpu_seconds
from flowmap.loadgen import run_load
from flowmap.reports import pyplot, save_figure, write_report


@dataclass
class OverloadBenchConfig:
    bundle: str = "models/digits"  # the bundle to serve
    capacity_clients: int = 64  # a concurrency the server keeps up with
    overload_clients: int = 256  # 4x that
    max_queue_size: int = 256  # rows admitted per engine
    images: int = 4  # per student request
    steps: int = 2  # student jumps per request
    teacher_clients: int = 8  # in the mixed run, on top of the overload
    teacher_steps: int = 50  # per teacher request in the mixed run
    request_timeout_s: float = 30.0  # the server's deadline per request
    seconds: float = 8.0  # per run
    out: str = "docs/overload"  # writes OUT.md, OUT.json and OUT.png


def student_bodies(images: int, steps: int) -> list[dict]:
    return [{"labels": [(i + j) % 10 for j in range(images)], "seeds": list(range(images * i, images * i + images)),
             "steps": steps} for i in range(64)]


def run_phase(server: ServerProcess, populations: list[tuple[str, list[dict], int, int]], seconds: float,
              honour_retry_after: bool) -> dict:
    """Run client populations (name, bodies, clients, images per request) side by side."""
    async def together():
        return await asyncio.gather(*(run_load("127.0.0.1", server.port, "/v1/generate", bodies, clients, seconds,
                                               images, warmup_s=1.0, honour_retry_after=honour_retry_after)
                                      for _, bodies, clients, images in populations))

    cpu_before = cpu_seconds(server.process.pid)
    results = asyncio.run(together())
    out = {name: result.summary() for (name, *_), result in zip(populations, results, strict=True)}
    out["server_cpu_share"] = round((cpu_seconds(server.process.pid) - cpu_before) / results[0].seconds, 3)
    return out


def only_200_or_429_with_hint(run: dict) -> bool:
    return set(run["statuses"]) <= {200, 429} and run["refusals_without_retry_after"] == 0


def run_overload_bench(config: OverloadBenchConfig, progress: bool = True) -> dict:
    say = print if progress else (lambda *a, **k: None)
    students = student_bodies(config.images, config.steps)
    teacher_name = f"{Path(config.bundle).name}-teacher"
    teachers = [{**b, "steps": config.teacher_steps, "model": teacher_name} for b in students]
    crowd = ("student", students, config.overload_clients, config.images)
    # name: (client populations, clients honour Retry-After, extra server flags)
    plan = {
        "capacity": ([("student", students, config.capacity_clients, config.images)], False, []),
        "overload_retrying_at_once": ([crowd], False, []),
        "overload_honouring_retry_after": ([crowd], True, []),
        "overload_with_teacher": ([crowd, ("teacher", teachers, config.teacher_clients, config.images)], True, []),
        "overload_no_waiting_retrying_at_once": ([crowd], False, ["--max-admission-wait-s", "0"]),
        "overload_no_waiting_honouring_retry_after": ([crowd], True, ["--max-admission-wait-s", "0"]),
    }
    phases: dict[str, dict] = {}
    for name, (populations, honour, flags) in plan.items():
        clients = " + ".join(f"{count} {kind}" for kind, _, count, _ in populations)
        say(f"[bench overload] {name}: {clients} clients for {config.seconds:g} s")
        server = ServerProcess(config.bundle, 8720, "--max-queue-size", str(config.max_queue_size),
                               "--request-timeout-s", str(config.request_timeout_s), *flags)
        try:
            phases[name] = run_phase(server, populations, config.seconds, honour)
        finally:
            server.stop()
    capacity = phases["capacity"]["student"]["images_per_s"]
    deadline_ms = 1000 * config.request_timeout_s
    checks = {}
    for name in plan:
        if name == "capacity":
            continue
        runs = [run for key, run in phases[name].items() if key != "server_cpu_share"]
        checks[name] = {
            "goodput_vs_capacity": round(phases[name]["student"]["images_per_s"] / capacity, 3),
            "only_200_or_429_with_retry_hint": all(only_200_or_429_with_hint(r) for r in runs),
            "ok_p99_within_deadline": all(r["ok_p99_ms"] <= deadline_ms for r in runs),
        }
    teacher = phases["overload_with_teacher"]["teacher"]
    checks["overload_with_teacher"]["teacher_completed"] = teacher["statuses"].get(200, 0)
    report = {
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "phases": phases,
        "capacity_images_per_s": capacity,
        "checks": checks,
    }
    write_report(report, config.out, _plot, render_overload_markdown)
    return report


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    names = list(report["phases"])
    goodput = [report["phases"][n]["student"]["images_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([n.replace("_", " ") for n in names], goodput, color=["grey"] + ["tab:blue"] * (len(names) - 1))
    ax.axvline(0.8 * report["capacity_images_per_s"], color="tab:red", linestyle=":", label="0.8x capacity")
    ax.set_xlabel("student images/s answered 200")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.suptitle("flowmap serve under 4x overload")
    save_figure(fig, path)


def render_overload_markdown(report: dict, plot_name: str) -> str:
    config, phases, checks = report["config"], report["phases"], report["checks"]
    lines = [
        "# Overload benchmark",
        "",
        f"Written by `flowmap bench overload` on {report['machine']['cpus']} CPUs ({report['machine']['platform']}); "
        "the load generator runs on the same cores as the server, and every figure comes from one run. Requests: "
        f"{config['images']} images x {config['steps']} student steps (`/v1/generate`), queue "
        f"`--max-queue-size {config['max_queue_size']}` rows per engine, deadline "
        f"`--request-timeout-s {config['request_timeout_s']:g}`; mixed run: {config['teacher_clients']} more "
        f"clients asking the teacher for {config['images']} images x {config['teacher_steps']} steps.",
        "",
        f"Capacity at {config['capacity_clients']} clients: **{report['capacity_images_per_s']:.0f} images/s**.",
        "",
        "| run | clients | images/s (200) | vs capacity | statuses | p99 of 200s ms | max of 200s ms "
        "| only 200 / 429 + hint | server CPU |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for name, phase in phases.items():
        for population, run in phase.items():
            if population == "server_cpu_share":
                continue
            check = checks.get(name, {})
            ratio = f"{run['images_per_s'] / report['capacity_images_per_s']:.2f}x" if population == "student" else ""
            statuses = ", ".join(f"{code}: {count}" for code, count in sorted(run["statuses"].items()))
            hint = ("yes" if only_200_or_429_with_hint(run) else "**no**") if check else ""
            lines.append(f"| {name.replace('_', ' ')} ({population}) | {run['clients']} | {run['images_per_s']:.0f} "
                         f"| {ratio} | {statuses} | {run['ok_p99_ms']:.1f} | {run['ok_max_ms']:.1f} | {hint} "
                         f"| {phase['server_cpu_share']:.2f} |")
    at_once, honour = checks["overload_retrying_at_once"], checks["overload_honouring_retry_after"]
    no_wait = checks["overload_no_waiting_retrying_at_once"]
    ratio = config["overload_clients"] // config["capacity_clients"]

    def verdict(value: float) -> str:
        return "met" if value >= 0.8 else "**missed**"

    lines += [
        "",
        f"![goodput under overload]({plot_name})",
        "",
        "## Against the goals",
        "",
        f"- Goodput under {ratio}x overload: clients that retry at once (as wrk does) "
        f"{at_once['goodput_vs_capacity']}x capacity ({verdict(at_once['goodput_vs_capacity'])}); clients "
        "honouring Retry-After "
        f"{honour['goodput_vs_capacity']}x ({verdict(honour['goodput_vs_capacity'])}); goal >= 0.8x.",
        f"- Every answer 200 or 429 with Retry-After: "
        f"{'yes' if all(c['only_200_or_429_with_retry_hint'] for c in checks.values()) else '**no**'}; p99 of the "
        f"200s within the {config['request_timeout_s']:g} s deadline: "
        f"{'yes' if all(c['ok_p99_within_deadline'] for c in checks.values()) else '**no**'}.",
        f"- Teacher requests mixed into the overload: {checks['overload_with_teacher']['teacher_completed']} "
        f"completed (statuses {phases['overload_with_teacher']['teacher']['statuses']}); the student's goodput "
        f"beside them {checks['overload_with_teacher']['goodput_vs_capacity']}x (the teacher's steps take their "
        "share of the same cores).",
        f"- Without the wait at the door (`--max-admission-wait-s 0`: refuse the moment the queue is full), clients "
        f"retrying at once bring goodput to {no_wait['goodput_vs_capacity']}x: the server spends its cores "
        "answering refusals.",
        "",
        "Admission happens once per request, at the door (`server/admission.py`): a request reserves its rows "
        "in each engine's queue until its last call of that engine, so its later steps never meet a full queue, "
        "and a refusal costs no engine work. A request that finds the queue full waits at the door, first come "
        "first served, when the measured drain rate says room comes within `max_admission_wait_s` (1 s by default); "
        "otherwise it gets 429 at once, with Retry-After from the same drain rate.",
    ]
    return "\n".join(lines) + "\n"
