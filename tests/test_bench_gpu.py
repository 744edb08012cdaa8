"""`flowmap bench gpu` at toy sizes on the CPU: the same code a lent GPU runs at real sizes, every part
(peak, stages through the serving engine, JPEG, a bundle served on the torch backend) and its report."""

import pytest

pytest.importorskip("diffusers")


def test_the_gpu_bench_runs_every_part_on_a_cpu(tmp_path, tiny_latent):
    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench
    from flowmap.gpu_config import DECODERS
    from flowmap.gpu_report import missing, one_step

    # the served part on the tests' latent bundle (--served-bundle): building its own SiT + SD-VAE bundle took half
    # this test's time, and its parts are tested on their own (the public layout in tests/test_sit.py)
    config = GpuBenchConfig(device="cpu", scale="tiny", batches=(1, 2), modes=("eager-fp32", "eager-bf16",
                            "graphs-bf16", "graphs-bf16-nhwc", "compiled-graphs-fp8"), repeats=1,
                            jpeg_sides=(64,), jpeg_images=2,
                            served_seconds=1.0, served_bundle=str(tiny_latent[0]), out=str(tmp_path / "gpu"))
    report = run_gpu_bench(config)
    assert report["peak"]["tflops"] > 0
    rows = report["stages"]
    for name in config.models:
        measured = [r for r in rows if r["model"] == name and "batch" in r]
        assert {(r["mode"], r["batch"]) for r in measured} == {(m, b) for m in ("eager-fp32", "eager-bf16")
                                                                for b in (1, 2)}
        assert all(r["ms"] > 0 and r["mfu"] > 0 and r["gflops_per_image"] > 0 for r in measured)
        assert any(r["mode"] == "eager-bf16" and r["parity"] > 0 for r in measured)
        skipped = next(r for r in rows if r["model"] == name and r["mode"] == "graphs-bf16")
        assert skipped["skipped"] == "CUDA graphs need a CUDA device"
        channels_last = next(r for r in rows if r["model"] == name and r["mode"] == "graphs-bf16-nhwc")
        assert channels_last["skipped"] == ("CUDA graphs need a CUDA device" if name in DECODERS
                                            else "channels-last is timed on the decoders")
        float8 = next(r for r in rows if r["model"] == name and r["mode"] == "compiled-graphs-fp8")
        assert float8["skipped"] == ("float8 is timed on the denoisers (a decoder's time is in its convolutions)"
                                     if name in DECODERS else "CUDA graphs need a CUDA device")
    assert missing(report) == []  # skipped on purpose, not cut off
    fastest = {name: min(r["ms"] for r in rows if r["model"] == name and r.get("batch") == 1)
               for name in ("sana-1024", "dc-ae-1024")}
    step = one_step(report)  # SANA's transformer and DC-AE decoder, each in its fastest mode at batch 1
    assert step["ms"] == round(fastest["sana-1024"] + fastest["dc-ae-1024"], 2) and step["dc-ae-1024"]["ms"] > 0
    per_image = {name: min(r["ms"] / r["batch"] for r in rows if r["model"] == name and "batch" in r)
                 for name in fastest}  # throughput: each at its best batch and mode, run in turn
    assert step["images_per_s"] == round(1000 / (per_image["sana-1024"] + per_image["dc-ae-1024"]), 2)
    assert any(r["encoder"] == "simplejpeg (cpu)" and r["ms_per_image"] > 0 for r in report["jpeg"])
    served = report["served"]
    assert served["images_per_s"] > 0 and served["limit_images_per_s"] > 0
    assert set(map(str, served["statuses"])) == {"200"}  # every request answered
    assert "--backend torch" in " ".join(served["flags"])
    assert served["clients"] == 4  # by default twice the largest batch: one batch waits while another computes
    in_step = served["in_step"]  # and as many as one batch holds, on the same server
    assert in_step["clients"] == 2 and in_step["images_per_s"] > 0 and set(map(str, in_step["statuses"])) == {"200"}
    assert all(0 < use["rows_per_batch"] <= 2 for use in in_step["engines"].values())
    # where its time went: both engines batched rows and computed, and every stage of a request was timed
    assert set(served["engines"]) >= {"decoder"} and len(served["engines"]) == 2
    assert all(use["batches"] > 0 and use["rows_per_batch"] >= 1 and 0 < use["busy"] < 1
               for use in served["engines"].values())
    assert all(use["padding_per_batch"] == 0 for use in served["engines"].values())  # no buckets on a CPU engine
    assert {"student", "decoder", "encode"} <= set(served["stage_ms_per_request"])
    assert set(served["images_encoded"]) == {"cpu"}  # no GPU here; the load's images (and warm-up's) counted
    assert served["images_encoded"]["cpu"] >= sum(served["statuses"].values())
    assert set(served["encode_ms_per_request"]) == {"wait", "copy", "encode"}
    assert served["encode_ms_per_request"]["encode"] > 0 and served["loop_lag_ms"] >= 0
    assert served["cpu_cores"]["process"] >= served["cpu_cores"]["event_loop"] > 0  # the server's, from /proc
    assert (served["encode_threads"], served["gil_switch_interval_ms"]) == (2, 0.5)  # as a CPU server runs
    text = (tmp_path / "gpu.md").read_text()
    step_line = next(line for line in text.splitlines() if line.startswith("One step"))
    assert step_line.startswith("One step at toy sizes, batch 1: sana-1024") and "SANA-Sprint" not in step_line
    assert "SANA-Sprint" in text and "StreamDiffusion" in text and (tmp_path / "gpu.png").is_file()
    assert "Where the load's time went" in text and "decoder: " in text and "4 clients of one-image" in text
    assert f"images encoded by the CPU {served['images_encoded']['cpu']};" in text
    assert "the encode stage's ms a request: waiting for an encode thread" in text and "its event loop" in text
    assert "; 2 encode threads, the GIL handed over every 0.5 ms;" in text
    assert "The same server with 2 clients, as many as one batch holds" in text


def test_the_one_command_check_runs_the_gpu_tests_and_resumes_the_bench(tmp_path):
    """scripts/gpu_check.sh on a CPU: the gpu-marked tests run (and skip, saying why), the bench goes on from an
    earlier report, and all of it lands in the output folder."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench

    out, tiny = tmp_path / "check", ["--device", "cpu", "--scale", "tiny", "--repeats", "1"]
    earlier = run_gpu_bench(GpuBenchConfig(device="cpu", scale="tiny", repeats=1, parts=("peak",),
                                           out=str(tmp_path / "earlier")))
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"

    def check(**env: str) -> subprocess.CompletedProcess:  # no wheels to install: this Python has what it needs
        return subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path), **env})

    done = check(TOTAL_S="300", RESUME_FROM=str(tmp_path / "earlier.json"),
                 BENCH_FLAGS=" ".join([*tiny, "--parts", "peak", "jpeg", "--jpeg-sides", "64"]))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "gpu check finished in" in done.stdout and "(status 0)" in done.stdout
    assert "needs a CUDA GPU" in (out / "gpu-tests.txt").read_text()  # skipped, and why
    report = json.loads((out / "gpu.json").read_text())
    assert report["peak"] == earlier["peak"] and report["jpeg"] and len(report["runs"]) == 2  # kept, then went on
    assert (out / "gpu.md").is_file() and (out / "device.txt").is_file()
    # cut off by its time: it says how to go on from what it saved
    cut = check(RUN_TESTS="0", BENCH_TIMEOUT_S="1", BENCH_FLAGS=" ".join(tiny))
    assert cut.returncode == 1 and f"RESUME_FROM={out}/gpu.json RUN_TESTS=0" in cut.stdout, cut.stdout[-2000:]


def test_unknown_models_modes_and_parts_are_refused_by_name():
    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench

    for field, value, allowed in (("models", ("sdxl",), "sit-xl/2, sana-1024, sd-vae-256, dc-ae-1024"),
                                  ("modes", ("eager-fp8",), "eager-fp32, eager-bf16"), ("parts", ("flops",), "peak")):
        with pytest.raises(ValueError, match=f"--{field}: unknown '{value[0]}'; choose from {allowed}"):
            run_gpu_bench(GpuBenchConfig(device="cpu", scale="tiny", **{field: value}))


def test_a_served_bundle_it_cannot_serve_is_refused_before_any_part_runs(tmp_path):
    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench

    from serving import ROOT

    digits = ROOT / "models" / "digits"  # no decoder: not a latent bundle
    config = GpuBenchConfig(device="cpu", scale="tiny", served_bundle=str(digits), out=str(tmp_path / "gpu"))
    with pytest.raises(ValueError, match=f"--served-bundle {digits}: the served part takes a latent bundle "
                                         r"\(one with a decoder\)"):
        run_gpu_bench(config)
    assert not (tmp_path / "gpu.json").exists()


def test_a_restart_is_timed_in_a_new_process_from_the_same_program(tmp_path):
    """What a compiled mode's restart figure runs (eager here: a cold compile on a CPU takes most of a minute)."""
    import torch

    from export.programs import export_program
    from flowmap.gpu_stages import model, restart_seconds
    from server.torch_engine import TorchOptions

    graph, inputs = model("sd-vae-256", "tiny")
    path = export_program(graph, inputs(2), tmp_path / "decoder.pt2")
    assert restart_seconds(path, "decoder", TorchOptions(), (1, 2)) > 0
    torch.save({"not": "a program"}, tmp_path / "broken.pt2")
    with pytest.raises(RuntimeError, match="the restarted engine failed: RuntimeError"):
        restart_seconds(tmp_path / "broken.pt2", "decoder", TorchOptions(), (1,))


def test_a_resumed_report_keeps_a_served_figure_only_for_the_same_bundle_and_load(tmp_path):
    import json
    from dataclasses import asdict

    from flowmap.bench_gpu import GpuBenchConfig, code_versions, resumed

    setup = {"device_name": "NVIDIA H200", "torch": "2.11.0", "code": code_versions()}
    earlier = GpuBenchConfig(out=str(tmp_path / "gpu"))
    (tmp_path / "gpu.json").write_text(json.dumps({**setup, "config": asdict(earlier), "errors": [], "stages": [],
                                                   "peak": {"tflops": 780.0}, "served": {"images_per_s": 119.5}}))
    report, done, other_code = resumed(setup, earlier)
    assert other_code == [] and {"peak", "served"} <= done and report["served"] == {"images_per_s": 119.5}
    for changed in ({"served_bundle": str(tmp_path)}, {"served_denoiser": "XL/2"}, {"served_clients": 64},
                    {"batches": (1, 8, 32)}):  # the default 0 is twice the largest batch: 128 for 64, 64 for 32
        report, done, _ = resumed(setup, GpuBenchConfig(**{**asdict(earlier), **changed}))
        assert "peak" in done and "served" not in done and "served" not in report, changed
    assert "served" in resumed(setup, GpuBenchConfig(**{**asdict(earlier), "served_clients": 128}))[1]  # the same load


def test_the_served_sentence_names_the_clients_of_a_report_from_before_their_default_was_0():
    from flowmap.gpu_report import served_line

    served = {"denoiser": "B/2", "flags": ["--backend", "torch"], "images_per_s": 119.5, "p50_ms": 536.1,
              "statuses": {"200": 2390}, "limit_images_per_s": 237.19, "vs_limit": 0.504}
    assert "64 clients of one-image" in served_line({"config": {"served_clients": 64}, "served": served})
    assert "128 clients of one-image" in served_line({"config": {"served_clients": 0},
                                                      "served": {**served, "clients": 128}})


def test_the_goals_judge_compiled_cuda_graphs_by_their_faster_mode_against_each_eager():
    from flowmap.gpu_report import goals

    def row(mode, batch, ms, **extra):
        return {"model": "sit-xl/2", "mode": mode, "batch": batch, "ms": ms, "parity": 0.004, **extra}

    rows = [row("eager-fp32", 32, 200.0), row("eager-bf16", 32, 40.0), row("graphs-bf16", 32, 10.0),
            row("compiled-graphs-bf16", 32, 21.0), row("autotuned-graphs-bf16", 32, 19.0),
            row("compiled-graphs-bf16", 64, 40.0, mfu=0.48), row("eager-bf16", 64, 70.0, mfu=0.26),
            row("compiled-graphs-fp8", 32, 12.5, parity=0.03)]
    judged = goals({"stages": rows, "served": {"vs_limit": 0.69}})
    # float8 is faster, and judged on its own line, against the fastest bf16 mode: the bf16 goals compare the same
    # precision
    assert judged["sit-xl/2: compiled-graphs-fp8 >= 1.1x autotuned-graphs-bf16 at batch 32"] == {
        "met": True, "measured": "1.52x"}
    assert judged["sit-xl/2: fp8 within 0.1 of the output's scale"] == {"met": True, "measured": "0.03"}
    assert judged["sit-xl/2: bf16 within 0.1 of the output's scale"] == {"met": True, "measured": "0.004"}
    # hand-captured graphs of eager kernels (10 ms) are not "compiled + CUDA graphs"; the autotuned mode is
    assert judged["sit-xl/2: autotuned-graphs-bf16 >= 2x eager-bf16 at batch 32"] == {"met": True,
                                                                                      "measured": "2.11x"}
    assert judged["sit-xl/2: autotuned-graphs-bf16 >= 2x eager-fp32 at batch 32"]["measured"] == "10.53x"
    assert judged["sit-xl/2: denoiser MFU >= 40% at batch 64 in bf16"] == {"met": True, "measured": "48.0%"}
    assert judged["served >= 0.7x the stage limit"] == {"met": False, "measured": "0.69x"}
    slower = goals({"stages": [r for r in rows if r["mode"] != "autotuned-graphs-bf16"]})
    assert slower["sit-xl/2: compiled-graphs-bf16 >= 2x eager-bf16 at batch 32"] == {"met": False,
                                                                                     "measured": "1.90x"}


def test_flops_count_attention_as_a_gpu_runs_it():
    """Two products of [16, 8] by [8, 16] and [16, 16] by [16, 8] per head: 4 * 16 * 16 * 8 operations each."""
    import torch

    from flowmap.gpu_stages import flops_per_image

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    inputs = lambda batch: {name: torch.randn(batch, 2, 16, 8) for name in "qkv"}  # noqa: E731
    assert flops_per_image(Attention(), inputs) == 2 * 4 * 16 * 16 * 8


def test_a_cut_off_gpu_bench_resumes_where_it_stopped(tmp_path, capsys):
    """--resume keeps the rows an earlier run measured, runs only the (model, mode) pairs it lacks or
    failed, says what is still missing, refuses a report measured on another card, and measures again a part
    timed by other code."""
    import json

    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench
    from flowmap.gpu_report import missing

    out = tmp_path / "gpu"
    tiny = {"device": "cpu", "scale": "tiny", "batches": (1, 2), "repeats": 1, "models": ("sit-xl/2",),
            "parts": ("stages",), "out": str(out)}
    first = run_gpu_bench(GpuBenchConfig(**tiny, modes=("eager-fp32",)))
    assert missing(first) == []
    saved = json.loads(out.with_suffix(".json").read_text())
    saved["stages"].append({"model": "sit-xl/2", "mode": "eager-bf16", "skipped": "RuntimeError: out of memory"})
    out.with_suffix(".json").write_text(json.dumps(saved))
    wanted = GpuBenchConfig(**tiny, modes=("eager-fp32", "eager-bf16"), resume=True)
    assert missing({**saved, "config": {**saved["config"], "modes": ["eager-fp32", "eager-bf16"]}}) == [
        "sit-xl/2 eager-bf16"]  # a failed mode is not a measured one
    second = run_gpu_bench(wanted)
    rows = {(r["mode"], r["batch"]): r for r in second["stages"] if "batch" in r}
    assert set(rows) == {(m, b) for m in ("eager-fp32", "eager-bf16") for b in (1, 2)}
    assert all(rows[("eager-fp32", row["batch"])] == row for row in first["stages"])  # kept, not measured again
    assert not any("skipped" in r for r in second["stages"]) and len(second["runs"]) == 2
    saved = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**saved, "device_name": "NVIDIA H100 80GB HBM3"}))
    with pytest.raises(ValueError, match="measured with device_name 'NVIDIA H100 80GB HBM3'"):
        run_gpu_bench(wanted)
    stale = [{**row, "ms": -1.0} for row in saved["stages"]]  # what other code measured: must not stay
    for code in ({**saved["code"], "stages": "0123456789ab"}, "0123456789ab"):  # one version: an older report
        out.with_suffix(".json").write_text(json.dumps({**saved, "code": code, "stages": stale}))
        capsys.readouterr()  # what the earlier runs said
        again = run_gpu_bench(wanted)
        assert "stages" in capsys.readouterr().out.split("timed by other code: ")[1].split(" (")[0]
        assert {(r["mode"], r["batch"]) for r in again["stages"] if "batch" in r} == set(rows)
        assert all(r["ms"] > 0 for r in again["stages"] if "batch" in r)
        assert again["code"] == second["code"] and len(again["runs"]) == 3


def test_the_readme_block_reads_a_report_without_a_peak_or_nvjpeg(tmp_path):
    """A run cut off before its peak, or on a card without torchvision, still writes its README block."""
    import json
    from pathlib import Path

    from flowmap.readme import gpu_block

    report = json.loads((Path(__file__).resolve().parents[1] / "docs" / "gpu.json").read_text())
    report.pop("peak")
    report["jpeg"] = [{"encoder": "simplejpeg (cpu)", "side": 256, "ms_per_image": 1.287},  # a report may lack it
                      {"encoder": "simplejpeg (cpu)", "side": 1024, "ms_per_image": 31.3587},
                      {"encoder": "nvjpeg", "skipped": "ModuleNotFoundError: No module named 'torchvision'"}]
    report["stages"] = [{key: value for key, value in row.items() if key != "mfu"} for row in report["stages"]]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "gpu.json").write_text(json.dumps(report))
    text = gpu_block(tmp_path)
    assert "matmul peak" not in text and "nvJPEG" not in text
    cpu = {row["side"]: row["ms_per_image"] for row in report["jpeg"] if row["encoder"] == "simplejpeg (cpu)"}
    assert f"256 px: simplejpeg on the CPU {cpu[256]}; 1024 px: simplejpeg on the CPU {cpu[1024]}." in text
    compiled = {row["batch"]: round(row["images_per_s"]) for row in report["stages"]
                if (row["model"], row["mode"]) == ("sit-xl/2", "compiled-graphs-bf16")}
    assert (f"| sit-xl/2 | compiled-graphs-bf16 | {compiled[1]} | {compiled[8]} | {compiled[32]} | {compiled[64]} "
            "| - |") in text  # no MFU without a peak


def test_each_part_is_versioned_by_the_code_it_runs():
    """A part's version hashes the files its modules import, inside functions too and transitively: the server's
    encoder is timed by the served part, not by the stages, and the torch engine by both."""
    from flowmap.bench_gpu import TIMED_MODULES, code_versions
    from flowmap.provenance import ROOT, code_version, imported_files

    stages, served = (set(imported_files(TIMED_MODULES[part])) for part in ("stages", "served"))
    engine, encoder, programs = (ROOT / name for name in ("server/torch_engine.py", "server/encoding.py",
                                                          "export/programs.py"))
    assert {engine, programs} <= stages and {engine, programs, encoder, ROOT / "server/app.py"} <= served
    assert encoder not in stages and ROOT / "flowmap/gpu_report.py" not in served | stages  # rewording is free
    assert ROOT / "flowmap/cli.py" not in served  # its other commands would drag every bench in
    assert code_versions()["served"] != code_version(TIMED_MODULES["served"])  # but `flowmap serve` counts
