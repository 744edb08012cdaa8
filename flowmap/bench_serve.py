"""`flowmap bench serve`: throughput and latency of the HTTP server against concurrency, with
batching on and off; the raw in-process engine at the same batch sizes; the student's 1-NFE
throughput against the teacher's 100 steps; and a CPU account of where each request's time goes.
Writes docs/serving.md, docs/serving.json and docs/serving.png."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from flowmap.loadgen import run_load
from flowmap.reports import pyplot, save_figure, write_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeBenchConfig:
    bundle: str = "models/digits"  # the bundle to serve
    levels: tuple[int, ...] = (1, 4, 16, 64, 256)  # concurrent clients to measure at
    seconds: float = 4.0  # per measurement
    raw_batches: tuple[int, ...] = (1, 4, 16, 64, 256)  # batch sizes of the in-process engine runs
    max_batch_size: int = 64  # the server's setting
    max_queue_delay_ms: float = 2.0  # the server's setting
    teacher_steps: int = 100  # Euler steps of the teacher the student is compared with
    out: str = "docs/serving"  # writes OUT.md, OUT.json and OUT.png


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    def __init__(self, bundle: str, port: int, *flags: str, ready_timeout_s: float = 120.0):
        self.url, self.port = f"http://127.0.0.1:{port}", port
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server; read if it fails to start)
        self.process = subprocess.Popen([sys.executable, "-m", "flowmap.cli", "serve", "--bundle", bundle,
                                         "--port", str(port), "--request-timeout-s", "120", *flags],
                                        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        give_up = time.monotonic() + ready_timeout_s
        while time.monotonic() < give_up and self.process.poll() is None:
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        exited = self.process.poll()
        self.log.seek(0)
        tail = "\n".join(self.log.read().splitlines()[-15:])
        self.stop()
        why = f"exited with status {exited}" if exited is not None else "did not become ready"
        raise RuntimeError(f"the server {why}:\n{tail}")

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
        self.log.close()


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

    cpu_ms: dict[int, float] = {}

    def rate(engine, feeds_for, batch):
        feeds = feeds_for(batch)
        engine.run(feeds)
        runs, started, cpu = 0, time.perf_counter(), os.times()
        while time.perf_counter() - started < seconds:
            engine.run(feeds)
            runs += 1
        elapsed, spent = time.perf_counter() - started, os.times()
        if engine is student:  # CPU (all engine threads) per image, for the account of served runs
            cpu_ms[batch] = 1000 * ((spent.user - cpu.user) + (spent.system - cpu.system)) / (runs * batch)
        return runs * batch / elapsed

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
        "student_cpu_ms_per_image": {str(b): round(v, 5) for b, v in cpu_ms.items()},
    }


def account(run: dict, raw: dict, encoding_ms: float, images_per_request: int) -> dict:
    """Where one request's CPU goes: the engine (its in-process cost per image at the nearest batch
    size), PNG encoding, and everything else in the server (HTTP, validation, JSON, the event loop)."""
    costs = {int(b): v for b, v in raw["student_cpu_ms_per_image"].items()}
    batch = run.get("mean_batch_rows") or 1
    nearest = min(costs, key=lambda b: abs(np.log(b) - np.log(batch)))
    engine = images_per_request * costs[nearest]
    encoding = images_per_request * encoding_ms
    server = run["server_cpu_ms_per_request"]
    return {"engine_ms": round(engine, 4), "encoding_ms": round(encoding, 4),
            "http_and_rest_ms": round(max(server - engine - encoding, 0.0), 4), "server_ms": server,
            "loadgen_ms": run["loadgen_cpu_ms_per_request"]}


def encoding_cost_ms(bundle_dir: str, images: int = 2000) -> float:
    """Milliseconds of PNG + base64 encoding per image, in process."""
    from export.bundle import read_bundle
    from server.encoding import OutputFormat, encode_b64

    shape = read_bundle(bundle_dir).image_shape
    batch = np.random.default_rng(0).uniform(-1, 1, (images, *shape)).astype(np.float32)
    started = time.perf_counter()
    encode_b64(batch, OutputFormat())
    return 1000 * (time.perf_counter() - started) / images


def run_serve_bench(config: ServeBenchConfig, progress: bool = True) -> dict:
    from export.bundle import read_bundle
    from server.engines import student_engine

    say = print if progress else (lambda *a, **k: None)
    student = student_engine(read_bundle(config.bundle).students[0].guidance_scale)  # the default student
    say("[bench serve] raw engine throughput")
    raw = raw_engine(config.bundle, config.raw_batches, config.teacher_steps)
    single = [{"labels": [i % 10], "seeds": [i]} for i in range(64)]
    sixteen = [{"labels": [(i + j) % 10 for j in range(16)], "seeds": list(range(16 * i, 16 * i + 16))}
               for i in range(64)]
    modes = {"batching": ["--max-batch-size", str(config.max_batch_size), "--max-queue-delay-ms",
                          str(config.max_queue_delay_ms)],
             "no_batching": ["--max-batch-size", "1", "--max-queue-delay-ms", "0"]}
    curves: dict[str, list[dict]] = {}
    port = 8700
    results: dict = {}
    for mode, flags in modes.items():
        server = ServerProcess(config.bundle, port, "--max-queue-size", "100000", *flags)
        try:
            curves[mode] = []
            for clients in config.levels:
                say(f"[bench serve] {mode}: {clients} single-image clients")
                curves[mode].append(measure(server, "/v1/generate", single, clients, config.seconds, 1, student))
            if mode == "batching":
                say("[bench serve] 16-image requests at saturation")
                results["sixteen_image_requests"] = max(
                    (measure(server, "/v1/generate", sixteen, clients, config.seconds, 16, student)
                     for clients in (4, 16, 64)), key=lambda r: r["images_per_s"])
                say(f"[bench serve] teacher at {config.teacher_steps} steps")
                teacher_body = [{**b, "steps": config.teacher_steps, "model": f"{Path(config.bundle).name}-teacher"}
                                for b in sixteen]
                results["teacher_served"] = measure(server, "/v1/generate", teacher_body, 16,
                                                    max(config.seconds, 8.0), 16, "teacher")
        finally:
            server.stop()
        port += 1
    by_level = {mode: {r["clients"]: r for r in rows} for mode, rows in curves.items()}
    at64_on, at64_off = by_level["batching"].get(64), by_level["no_batching"].get(64)
    encoding_ms = encoding_cost_ms(config.bundle)
    for mode in curves:
        for run in curves[mode]:
            run["cpu_account_ms"] = account(run, raw, encoding_ms, 1)
    results["sixteen_image_requests"]["cpu_account_ms"] = account(results["sixteen_image_requests"], raw,
                                                                  encoding_ms, 16)
    report = {
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "curves": curves,
        "raw_engine": raw,
        **results,
        "encoding_ms_per_image": round(encoding_ms, 4),
        "ratios": {
            "batching_vs_batch1_at_64_clients": round(at64_on["images_per_s"] / at64_off["images_per_s"], 2)
            if at64_on and at64_off else None,
            "sixteen_image_served_vs_raw_engine": round(results["sixteen_image_requests"]["images_per_s"]
                                                        / raw["student_saturation_images_per_s"], 3),
            "sixteen_image_served_vs_raw_engine_at_max_batch": round(
                results["sixteen_image_requests"]["images_per_s"]
                / raw["student_images_per_s"][str(max(b for b in config.raw_batches
                                                      if b <= config.max_batch_size))], 3),
            # like for like: both served with 16-image requests, each at its best client count
            "student_vs_teacher_served": round(results["sixteen_image_requests"]["images_per_s"]
                                               / max(results["teacher_served"]["images_per_s"], 1e-9), 1),
            "student_vs_teacher_raw_engine": round(raw["student_saturation_images_per_s"]
                                                   / raw["teacher_images_per_s_at_steps"], 1),
        },
    }
    write_report(report, config.out, _plot, render_serve_markdown)
    return report


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
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
    save_figure(fig, path)


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
        f"| 16-image requests served vs raw engine at the server's max batch ({report['config']['max_batch_size']}) "
        f"| {ratios['sixteen_image_served_vs_raw_engine_at_max_batch']}x | |",
        f"| student 1-NFE vs teacher {report['config']['teacher_steps']} steps, served (16-image requests both) | "
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
    """A CPU account per request: the server process's CPU from /proc, the engine's share from its
    in-process CPU cost per image at the batch size the server actually ran, PNG encoding measured
    in process, and the load generator's own CPU."""
    at = {r["clients"]: r for r in report["curves"]["batching"]}
    off = {r["clients"]: r for r in report["curves"]["no_batching"]}
    top, off_top, one = at[64] if 64 in at else at[max(at)], off[64] if 64 in off else off[max(off)], at[min(at)]
    sixteen = report["sixteen_image_requests"]

    def line(run: dict) -> str:
        acc = run["cpu_account_ms"]
        return (f"{acc['server_ms']:.3f} ms server CPU per request = engine {acc['engine_ms']:.3f} + PNG "
                f"{acc['encoding_ms']:.3f} + HTTP, validation, JSON and the event loop {acc['http_and_rest_ms']:.3f}; "
                f"load generator {acc['loadgen_ms']:.3f} ms")

    cores = report["machine"]["cpus"]
    return [
        f"- **Batch-1 serving** ({off_top['clients']} clients, {off_top['images_per_s']:.0f} images/s): "
        f"{line(off_top)}. "
        f"Every request is its own engine run, handed to the engine thread and back, so the engine runs far below "
        f"its in-process speed ({off_top['mean_compute_ms_per_batch']} ms per batch-1 run against "
        f"{1000 / report['raw_engine']['student_images_per_s']['1']:.3f} ms in process): the hand-offs and the GIL, "
        "not arithmetic, bound it.",
        f"- **Batched serving** ({top['clients']} clients, {top['images_per_s']:.0f} images/s, mean batch "
        f"{top['mean_batch_rows']} rows): {line(top)}. HTTP handling is most of the CPU; with {cores} cores shared by "
        "the server and the load generator it bounds throughput, not the engine.",
        f"- **16-image requests** ({sixteen['images_per_s']:.0f} images/s): {line(sixteen)}. Sixteen images share "
        "one request's HTTP cost; the engine and PNG encoding now matter, and what is left is still the bound.",
        f"- **Latency at 1 client** is {one['p50_ms']:.2f} ms p50: up to {report['config']['max_queue_delay_ms']} ms "
        f"of queue delay waiting for company, one engine run ({one['mean_compute_ms_per_batch']} ms) and the HTTP "
        "round trip.",
        "- **The teacher** is bounded by its engine: 100 sequential guided evaluations (two network passes each) per "
        "image, batched across requests at every step, close to its in-process rate at the same batch size.",
    ]
