"""The command line: clear errors for unknown commands and methods, config flags from dataclasses."""

import os
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "flowmap.cli", *args], capture_output=True, text=True, timeout=120)


def test_unknown_method_is_a_clear_error():
    result = run("distill", "--method", "magic", "--teacher", "x", "--out", "y")
    assert result.returncode == 2
    assert "unknown method 'magic'; available: dmd2, fgm, freeflow, fsf-dmd, meanflow" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command():
    result = run("frobnicate")
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_method_options_are_flags():
    result = run("distill", "--method", "freeflow", "--help")
    assert result.returncode == 0
    for flag in ("--alpha", "--weight-power", "--derivative", "--intervals", "--guidance-min", "--cfg-min", "--steps",
                 "--max-minutes"):
        assert flag in result.stdout, flag


def test_a_run_stopped_by_max_minutes_exits_with_its_own_status_and_the_same_command_finishes_it(tmp_path):
    """A script that goes on to export after training must not export a network short of its steps: a run that
    --max-minutes stopped exits 3, saying so; the same command then trains on to the last step and exits 0."""
    command = ("teacher", "--data", "toy", "--out", str(tmp_path / "t"), "--steps", "3", "--quiet")
    stopped = run(*command, "--max-minutes", "0")
    assert stopped.returncode == 3, stopped.stderr
    assert "stopped at step 0, before the last (--max-minutes)" in stopped.stderr
    assert "'finished': False" in stopped.stdout
    finished = run(*command)
    assert finished.returncode == 0 and "'finished': True" in finished.stdout and "'step': 3" in finished.stdout


def test_a_bench_distill_segment_stopped_by_its_minutes_is_a_segment_done(tiny_digits_runs, tmp_path):
    """bench distill runs each segment to --max-minutes: exit status 3 is its normal end, not a failure."""
    from flowmap.bench_distill import DistillBenchConfig, train_segment

    config = DistillBenchConfig(teacher=str(tiny_digits_runs / "teacher"), minutes=0.02, segments=1,
                                options=("freeflow:batch-size=8",))
    summary = train_segment("freeflow", "freeflow", config, tmp_path / "freeflow", 0.0)
    assert summary["finished"] is False and summary["step"] > 0


def test_bad_data_is_a_clear_error(tmp_path):
    result = run("teacher", "--data", str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "t"), "--steps", "1")
    assert result.returncode == 2 and "unknown dataset" in result.stderr and "Traceback" not in result.stderr


def test_tensorrt_without_tensorrt_is_a_clear_stop(tmp_path):
    try:
        import pytest
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    result = run("export", "--tensorrt", "--skip-onnx", "--out", "models/digits")
    assert result.returncode == 2
    assert "TensorRT is not installed" in result.stderr and "Traceback" not in result.stderr


def test_export_skip_onnx_refuses_the_flags_only_an_export_reads(tmp_path):
    result = run("export", "--skip-onnx", "--torch-programs", "--student", "runs/x", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--student, --torch-programs: --skip-onnx adds to the bundle in --out as it is" in result.stderr
    scales = run("export", "--skip-onnx", "--guidance-scales", "3", "--out", str(tmp_path / "b"))
    assert scales.returncode == 2 and "--guidance-scales: --skip-onnx adds to the bundle" in scales.stderr
    nothing = run("export", "--skip-onnx", "--out", str(tmp_path / "b"))  # no bundle there to add to
    assert nothing.returncode == 2 and "holds none (no manifest.json)" in nothing.stderr


def test_bench_distill_entries_carry_their_own_options():
    from flowmap.bench_distill import method_flags, parse_entry

    assert parse_entry("fsf-dmd") == ("fsf-dmd", "fsf-dmd")
    assert parse_entry("fsf-dmd-m1=fsf-dmd") == ("fsf-dmd-m1", "fsf-dmd")
    options = ("fsf-dmd-m1:sim-steps=1", "fsf-dmd:lambda-dm=0.2", "meanflow:init=runs/x")
    assert method_flags("fsf-dmd-m1", options) == ["--sim-steps", "1"]
    assert method_flags("fsf-dmd", options) == ["--lambda-dm", "0.2"]
    try:
        parse_entry("cd=consistency")
    except ValueError as err:
        assert "unknown method 'consistency'" in str(err)
    else:
        raise AssertionError("an unknown method must be refused")


def test_every_config_flag_says_what_it_means():
    import dataclasses

    from distill.evaluate import EvalConfig
    from distill.methods import METHODS
    from distill.nets import NetConfig
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig
    from distill.verifier import VerifierConfig
    from export.tensorrt import TensorRTConfig
    from flowmap.bench_distill import DistillBenchConfig
    from flowmap.bench_overload import OverloadBenchConfig
    from flowmap.bench_recipe import RecipeBenchConfig
    from flowmap.bench_serve import ServeBenchConfig
    from flowmap.cli import field_help

    configs = [spec.config for spec in METHODS.values()] + [
        NetConfig, TeacherConfig, TrainConfig, VerifierConfig, EvalConfig, TensorRTConfig, ServeBenchConfig,
        DistillBenchConfig, OverloadBenchConfig, RecipeBenchConfig]
    for config in configs:
        notes = field_help(config)
        silent = [f.name for f in dataclasses.fields(config) if not notes.get(f.name)]
        assert not silent, f"{config.__name__}: fields without a comment for --help: {silent}"


def test_bad_parity_batches_are_refused_before_any_model_loads(tmp_path):
    result = run("export", "--student", str(tmp_path / "none"), "--teacher", str(tmp_path / "none"), "--verifier",
                 str(tmp_path / "none"), "--out", str(tmp_path / "b"), "--parity-batches", "1", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--parity-batches: batch sizes are 1 or more, got [1, 0]" in result.stderr
    assert not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "4"], "--replicas only apply with --ray"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1 and finite, got 0"),
    (["--ray", "--cpus-per-replica", "nan"], "--cpus-per-replica must be at least 0.01 and finite, got nan"),
    (["--ray", "--decoder-replicas", "2", "--gpus-per-replica", "inf"],
     "--gpus-per-replica must be at least 0 and finite, got inf"),
])
def test_serve_refuses_ray_flags_it_would_ignore_or_ray_would_fail_on(flags, message):
    result = run("serve", *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_serve_ray_without_ray_names_the_install(tmp_path):
    (tmp_path / "ray").mkdir()  # a package that fails to import, found before the installed one
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no Ray here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "flowmap.cli", "serve", "--ray", "--bundle", "models/digits"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "pip install 'flowmap-serve[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
