"""`flowmap bench serve`: throughput and latency of the HTTP server against concurrency, with
batching on and off; the raw in-process engine at the same batch sizes; the student's 1-NFE
throughput against the teacher's 100 steps; and a CPU account of where each request's time goes.
Writes docs/serving.md, docs/serving.json and docs/serving.png."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from flowmap.loadgen import run_load

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeBenchConfig:
    bundle: str = "models/digits"
    levels: tuple[int, ...] = (1, 4, 16, 64, 256)
    seconds: float = 4.0
    raw_batches: tuple[int, ...] = (1, 4, 16, 64, 256)
    max_batch_size: int = 64
    max_queue_delay_ms: float = 2.0
    teacher_steps: int = 100
    out: str = "docs/serving"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    def __init__(self, bundle: str, port: int, *flags: str):
        self.url, self.port = f"http://127.0.0.1:{port}", port
        self.process = subprocess.Popen([sys.executable, "-m", "flowmap.cli", "serve", "--bundle", bundle,
                                         "--port", str(port), "--request-timeout-s", "120", *flags],
                                        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become ready")

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                values[series] = float(value)
        return values

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def metric_delta(before: dict, after: dict, series: str) -> float:
    return after.get(series, 0.0) - before.get(series, 0.0)


def measure(server: ServerProcess, path: str, bodies: list[dict], clients: int, seconds: float,
            images_per_request: int, engine: str) -> dict:
    """One closed-loop run plus the server-side account: queue/compute time, batch sizes, CPU."""
    before, cpu_before = server.metrics(), cpu_seconds(server.process.pid)
    result = asyncio.run(run_load("127.0.0.1", server.port, path, bodies, clients, seconds, images_per_request))
    after, cpu_after = server.metrics(), cpu_seconds(server.process.pid)
    label = f'{{engine="{engine}"}}'
    execs = metric_delta(before, after, f"flowmap_inference_exec_count_total{label}")
    rows = metric_delta(before, after, f"flowmap_inference_count_total{label}")
    compute = metric_delta(before, after, f"flowmap_inference_compute_duration_seconds_sum{label}")
    queue = metric_delta(before, after, f"flowmap_inference_queue_duration_seconds_sum{label}")
    items = metric_delta(before, after, f"flowmap_inference_queue_duration_seconds_count{label}")
    summary = result.summary()
    # the server's counters include the warm-up and tail outside the window: ratios, not totals
    summary.update({
        "mean_batch_rows": round(rows / execs, 2) if execs else None,
        "mean_compute_ms_per_batch": round(1000 * compute / execs, 3) if execs else None,
        "mean_queue_ms": round(1000 * queue / items, 3) if items else None,
        "engine_share_of_server_cpu": round(compute / max(cpu_after - cpu_before, 1e-9), 3),
        "server_cpu_share": round((cpu_after - cpu_before) / result.seconds, 3),
        "server_cpu_ms_per_request": round(1000 * (cpu_after - cpu_before) / max(result.requests, 1), 3),
        "loadgen_cpu_ms_per_request": round(1000 * result.client_cpu_s / max(result.requests, 1), 3),
    })
    return summary


def raw_engine(bundle_dir: str, batches: tuple[int, ...], teacher_steps: int, seconds: float = 1.5) -> dict:
    """In-process onnxruntime throughput of the student (images/s at each batch) and of the teacher."""
    from export.bundle import read_bundle
    from server.engines import OnnxRuntimeEngine

    bundle = read_bundle(bundle_dir)
    student = OnnxRuntimeEngine(bundle.students[0].path, "student", max_batch=max(batches))
    teacher = OnnxRuntimeEngine(bundle.teacher.path, "teacher", max_batch=max(batches))
    rng = np.random.default_rng(0)

    def rate(engine, feeds_for, batch):
        feeds = feeds_for(batch)
        engine.run(feeds)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            engine.run(feeds)
            runs += 1
        return runs * batch / (time.perf_counter() - started)

    def student_feeds(b):
        return {"x": rng.standard_normal((b, *bundle.image_shape), dtype=np.float32), "t": np.ones(b, np.float32),
                "s": np.zeros(b, np.float32), "label": rng.integers(0, bundle.num_classes, b)}

    def teacher_feeds(b):
        return {"x": rng.standard_normal((b, *bundle.image_shape), dtype=np.float32),
                "t": np.full(b, 0.5, np.float32), "label": rng.integers(0, bundle.num_classes, b)}

    student_rates = {b: rate(student, student_feeds, b) for b in batches}
    teacher_rates = {b: rate(teacher, teacher_feeds, b) for b in batches}  # guided velocity evaluations/s
    return {
        "student_images_per_s": {str(b): round(v, 1) for b, v in student_rates.items()},
        "teacher_evals_per_s": {str(b): round(v, 1) for b, v in teacher_rates.items()},
        "teacher_images_per_s_at_steps": round(max(teacher_rates.values()) / teacher_steps, 2),
        "student_saturation_images_per_s": round(max(student_rates.values()), 1),
    }


def encoding_cost_ms(bundle_dir: str, images: int = 2000) -> float:
    """Milliseconds of PNG + base64 encoding per image, in process."""
    from export.bundle import read_bundle
    from server.imaging import b64_png

    shape = read_bundle(bundle_dir).image_shape
    batch = np.random.default_rng(0).uniform(-1, 1, (images, *shape)).astype(np.float32)
    started = time.perf_counter()
    b64_png(batch)
    return 1000 * (time.perf_counter() - started) / images


def run_serve_bench(cfg: ServeBenchConfig, progress: bool = True) -> dict:
    say = print if progress else (lambda *a, **k: None)
    say("[bench serve] raw engine throughput")
    raw = raw_engine(cfg.bundle, cfg.raw_batches, cfg.teacher_steps)
    single = [{"labels": [i % 10], "seeds": [i]} for i in range(64)]
    sixteen = [{"labels": [(i + j) % 10 for j in range(16)], "seeds": list(range(16 * i, 16 * i + 16))}
               for i in range(64)]
    modes = {"batching": ["--max-batch-size", str(cfg.max_batch_size), "--max-queue-delay-ms",
                          str(cfg.max_queue_delay_ms)],
             "no_batching": ["--max-batch-size", "1", "--max-queue-delay-ms", "0"]}
    curves: dict[str, list[dict]] = {}
    port = 8700
    results: dict = {}
    for mode, flags in modes.items():
        server = ServerProcess(cfg.bundle, port, "--max-queue-size", "100000", *flags)
        try:
            curves[mode] = []
            for clients in cfg.levels:
                say(f"[bench serve] {mode}: {clients} single-image clients")
                curves[mode].append(measure(server, "/v1/generate", single, clients, cfg.seconds, 1, "student@1.5"))
            if mode == "batching":
                say("[bench serve] 16-image requests at saturation")
                results["sixteen_image_requests"] = max(
                    (measure(server, "/v1/generate", sixteen, clients, cfg.seconds, 16, "student@1.5")
                     for clients in (4, 16, 64)), key=lambda r: r["images_per_s"])
                say(f"[bench serve] teacher at {cfg.teacher_steps} steps")
                teacher_body = [{**b, "steps": cfg.teacher_steps, "model": f"{Path(cfg.bundle).name}-teacher"}
                                for b in sixteen]
                results["teacher_served"] = measure(server, "/v1/generate", teacher_body, 16,
                                                    max(cfg.seconds, 8.0), 16, "teacher")
        finally:
            server.stop()
        port += 1
    by_level = {mode: {r["clients"]: r for r in rows} for mode, rows in curves.items()}
    at64_on, at64_off = by_level["batching"].get(64), by_level["no_batching"].get(64)
    served_student = max(r["images_per_s"] for r in curves["batching"])
    report = {
        "config": asdict(cfg),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "curves": curves,
        "raw_engine": raw,
        **results,
        "encoding_ms_per_image": round(encoding_cost_ms(cfg.bundle), 4),
        "ratios": {
            "batching_vs_batch1_at_64_clients": round(at64_on["images_per_s"] / at64_off["images_per_s"], 2)
            if at64_on and at64_off else None,
            "sixteen_image_served_vs_raw_engine": round(results["sixteen_image_requests"]["images_per_s"]
                                                        / raw["student_saturation_images_per_s"], 3),
            "student_vs_teacher_served": round(served_student / max(results["teacher_served"]["images_per_s"],
                                                                    1e-9), 1),
            "student_vs_teacher_raw_engine": round(raw["student_saturation_images_per_s"]
                                                   / raw["teacher_images_per_s_at_steps"], 1),
        },
    }
    write_serve_report(report, cfg.out)
    return report


def write_serve_report(report: dict, out: str) -> None:
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    _plot(report, out_path.with_suffix(".png"))
    out_path.with_suffix(".md").write_text(render_serve_markdown(report, out_path.with_suffix(".png").name))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in report["curves"].items():
        clients = [r["clients"] for r in rows]
        ax1.plot(clients, [r["images_per_s"] for r in rows], marker="o", label=mode.replace("_", " "))
        ax2.plot(clients, [r["p99_ms"] for r in rows], marker="o", label=f"{mode.replace('_', ' ')} p99")
        ax2.plot(clients, [r["p50_ms"] for r in rows], marker=".", linestyle="--",
                 label=f"{mode.replace('_', ' ')} p50")
    raw = report["raw_engine"]["student_saturation_images_per_s"]
    ax1.axhline(raw, color="grey", linestyle=":", label="raw engine (in process)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent single-image clients")
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("images / s")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    fig.suptitle("flowmap serve: 1-NFE student over HTTP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_serve_markdown(report: dict, plot_name: str) -> str:
    ratios, raw = report["ratios"], report["raw_engine"]
    lines = [
        "# Serving benchmark",
        "",
        f"Written by `flowmap bench serve` on {report['machine']['cpus']} CPUs ({report['machine']['platform']}); "
        "the load generator runs on the same cores as the server. Ratios come from one run.",
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        f"| batching vs batch-1 serving, 64 single-image clients | {ratios['batching_vs_batch1_at_64_clients']}x "
        "| >= 3x (goal 5x) |",
        f"| 16-image requests served vs raw engine at saturation | {ratios['sixteen_image_served_vs_raw_engine']}x "
        "| >= 0.8x |",
        f"| student 1-NFE vs teacher {report['config']['teacher_steps']} steps, served | "
        f"{ratios['student_vs_teacher_served']}x | >= 100x |",
        f"| student 1-NFE vs teacher {report['config']['teacher_steps']} steps, raw engine | "
        f"{ratios['student_vs_teacher_raw_engine']}x | |",
        "",
        f"![throughput and latency]({plot_name})",
        "",
        "## Single-image clients",
        "",
        "| mode | clients | images/s | p50 ms | p99 ms | mean batch | queue ms | compute ms/batch "
        "| server CPU ms/req | loadgen CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, rows in report["curves"].items():
        for r in rows:
            lines.append(f"| {mode.replace('_', ' ')} | {r['clients']} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} "
                         f"| {r['p99_ms']:.2f} | {r['mean_batch_rows']} | {r['mean_queue_ms']} "
                         f"| {r['mean_compute_ms_per_batch']} | {r['server_cpu_ms_per_request']} "
                         f"| {r['loadgen_cpu_ms_per_request']} |")
    sixteen, teacher = report["sixteen_image_requests"], report["teacher_served"]
    lines += [
        "",
        "## Raw engine (onnxruntime in process, no HTTP)",
        "",
        "| batch | student images/s | teacher guided evaluations/s |",
        "|---:|---:|---:|",
    ]
    for batch, rate in raw["student_images_per_s"].items():
        lines.append(f"| {batch} | {rate:.0f} | {raw['teacher_evals_per_s'][batch]:.0f} |")
    lines += [
        "",
        "## 16-image requests and the teacher",
        "",
        f"- 16-image requests, best of 4/16/64 clients ({sixteen['clients']}): {sixteen['images_per_s']:.0f} images/s "
        f"against {raw['student_saturation_images_per_s']:.0f} for the raw engine; mean batch "
        f"{sixteen['mean_batch_rows']} rows, p99 {sixteen['p99_ms']:.1f} ms.",
        f"- Teacher, {report['config']['teacher_steps']} Euler steps per image, 16 clients x 16 images: "
        f"{teacher['images_per_s']:.2f} images/s (mean batch {teacher['mean_batch_rows']} rows per step).",
        "",
        "## What bounds each figure",
        "",
        *bounds_text(report),
    ]
    return "\n".join(lines) + "\n"


def bounds_text(report: dict) -> list[str]:
    """A CPU account per request, from the server's own metrics and /proc."""
    at = {r["clients"]: r for r in report["curves"]["batching"]}
    top = at[max(at)]
    one = at[min(at)]
    off = {r["clients"]: r for r in report["curves"]["no_batching"]}
    off_top = off[max(off)]
    enc = report["encoding_ms_per_image"]
    return [
        f"- **Batch-1 serving** ({max(off)} clients): every request is its own engine run; the server spends "
        f"{off_top['server_cpu_ms_per_request']} ms CPU per request, of which the engine is "
        f"{100 * off_top['engine_share_of_server_cpu']:.0f}%: the rest is HTTP parsing, validation, "
        "JSON and the event loop.",
        f"- **Batched serving** ({max(at)} clients): mean batch {top['mean_batch_rows']} rows; the engine's "
        f"share of server CPU falls to {100 * top['engine_share_of_server_cpu']:.0f}%, so HTTP handling "
        f"({top['server_cpu_ms_per_request']} ms CPU per request in all) bounds throughput, and the load "
        f"generator takes another {top['loadgen_cpu_ms_per_request']} ms CPU per request on the same cores "
        f"(server {100 * top['server_cpu_share']:.0f}% + load generator {100 * top['loadgen_cpu_share']:.0f}% "
        "of one core).",
        f"- **Latency at 1 client** is {one['p50_ms']:.2f} ms p50: the queue delay "
        f"({report['config']['max_queue_delay_ms']} ms at most), one engine run "
        f"({one['mean_compute_ms_per_batch']} ms) and the HTTP round trip.",
        f"- **16-image requests** amortise HTTP over 16 images; what remains per image is the engine and the "
        f"PNG + base64 encoding ({enc:.3f} ms per image, measured in process).",
        "- **The teacher** is bounded by the engine alone: 100 sequential guided evaluations (two network passes "
        "each) per image, batched across requests at every step.",
    ]
