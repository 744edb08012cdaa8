"""`flowmap bench gpu` at toy sizes on the CPU: the same code a lent GPU runs at real sizes, every part
(peak, stages through the serving engine, JPEG, a bundle served on the torch backend) and its report."""

import pytest

pytest.importorskip("diffusers")


def test_the_gpu_bench_runs_every_part_on_a_cpu(tmp_path):
    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench

    config = GpuBenchConfig(device="cpu", scale="tiny", batches=(1, 2), modes=("eager-fp32", "eager-bf16",
                            "graphs-bf16"), repeats=1, jpeg_sides=(64,), jpeg_images=2, served_clients=2,
                            served_seconds=1.0, out=str(tmp_path / "gpu"))
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
    assert any(r["encoder"] == "simplejpeg (cpu)" and r["ms_per_image"] > 0 for r in report["jpeg"])
    served = report["served"]
    assert served["images_per_s"] > 0 and served["limit_images_per_s"] > 0
    assert set(map(str, served["statuses"])) == {"200"}  # every request answered
    assert "--backend torch" in " ".join(served["flags"])
    text = (tmp_path / "gpu.md").read_text()
    assert "SANA-Sprint" in text and "StreamDiffusion" in text and (tmp_path / "gpu.png").is_file()
