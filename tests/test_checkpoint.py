"""Checkpoints round-trip and a resumed run continues exactly where it stopped."""

import json

import pytest
import torch

from distill.checkpoint import CheckpointError, load_checkpoint, module_state, restore, save_checkpoint
from distill.data import toy_gaussians
from distill.models import Teacher, load_teacher
from distill.nets import NetConfig
from distill.pipeline import train_teacher
from distill.teacher import TeacherConfig
from distill.trainer import TrainConfig

NET = NetConfig(arch="mlp", width=32, depth=2, mlp_ratio=2.0)


def test_round_trip_restores_modules_optimizer_and_rng(tmp_path):
    model = Teacher(NetConfig(arch="mlp", shape=(2,), num_classes=3, width=16, depth=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.velocity(torch.randn(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    save_checkpoint(tmp_path, {"kind": "teacher", "step": 1}, {"m": model}, {"m": optimizer}, generator)

    other = Teacher(model.config)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    other_gen = torch.Generator()
    meta, tensors = load_checkpoint(tmp_path, kind="teacher")
    restore(meta, tensors, {"m": other}, {"m": other_opt}, other_gen)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state_a, state_b = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=other_gen))


def test_wrong_kind_and_missing_checkpoint_are_clear(tmp_path):
    save_checkpoint(tmp_path, {"kind": "verifier"}, {"m": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="holds a 'verifier' checkpoint, expected 'teacher'"):
        load_checkpoint(tmp_path, kind="teacher")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no module 'ema'"):
        module_state(load_checkpoint(tmp_path)[1], "ema")


def test_resuming_continues_the_same_run(tmp_path):
    data = toy_gaussians(512)
    straight, split = tmp_path / "straight", tmp_path / "split"
    config = lambda steps: TrainConfig(steps=steps, batch_size=64, lr=1e-3, checkpoint_every=1000)
    train_teacher(data, NET, TeacherConfig(), config(40), straight, progress=False)
    train_teacher(data, NET, TeacherConfig(), config(25), split, progress=False)
    summary = train_teacher(data, NET, TeacherConfig(), config(40), split, progress=False)  # resumes at 25
    assert summary["steps_this_run"] == 15 and summary["step"] == 40
    a, b = load_checkpoint(straight)[1], load_checkpoint(split)[1]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    logged = [json.loads(line)["step"] for line in (split / "log.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and logged[-1] == 40


def test_loaded_teacher_is_frozen_and_matches_its_ema(tmp_path):
    train_teacher(toy_gaussians(256), NET, TeacherConfig(), TrainConfig(steps=5, batch_size=32), tmp_path,
                  progress=False)
    teacher = load_teacher(str(tmp_path))
    ema = module_state(load_checkpoint(tmp_path)[1], "ema")
    assert all(torch.equal(v, ema[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_resuming_with_another_network_says_what_differs(tmp_path):
    data, quick = toy_gaussians(256), TrainConfig(steps=2, batch_size=16)
    train_teacher(data, NET, TeacherConfig(), quick, tmp_path / "run", progress=False)
    other = NetConfig(arch="mlp", width=48, depth=2, mlp_ratio=2.0)
    with pytest.raises(CheckpointError, match=r"net.width: checkpoint 32, now 48.*--no-resume"):
        train_teacher(data, other, TeacherConfig(), TrainConfig(steps=4, batch_size=16), tmp_path / "run",
                      progress=False)
    train_teacher(data, other, TeacherConfig(), quick, tmp_path / "run", progress=False, resume=False)  # starts over


def test_a_folder_named_relative_or_absolute_is_the_same_setting(tmp_path, monkeypatch):
    """A diffusers student records its pipeline folder as given: resuming it with the folder's absolute name
    (or the other way round) is the same run, while another folder still differs."""
    from distill.trainer import shape_differences

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = {"net": {"path": "pipeline", "family": "sana"}}
    assert shape_differences(relative, {"net": {"path": str(tmp_path / "pipeline"), "family": "sana"}}) == []
    assert shape_differences(relative, {"net": {"path": "other", "family": "sana"}}) == [
        "net.path: checkpoint 'pipeline', now 'other'"]


def test_a_finished_run_resumed_says_it_has_nothing_to_train(tmp_path, capsys):
    config = TrainConfig(steps=3, batch_size=32, checkpoint_every=1000)
    train_teacher(toy_gaussians(128), NET, TeacherConfig(), config, tmp_path, progress=False)
    summary = train_teacher(toy_gaussians(128), NET, TeacherConfig(), config, tmp_path, progress=True)
    assert summary["steps_this_run"] == 0
    assert f"resuming {tmp_path} at step 3: it has reached --steps 3: nothing to train" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA GPU")
def test_training_on_cuda_without_one_is_a_clear_error_before_any_model_loads():
    with pytest.raises(ValueError, match="--device cuda: this torch .* sees no CUDA GPU; train with --device cpu"):
        TrainConfig(device="cuda")
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        TrainConfig(device="tpu")


def test_training_settings_out_of_range_are_refused_by_flag():
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="--steps must be at least 1, got -4"):
        TrainConfig(steps=-4)
    with pytest.raises(ValueError, match="--lr must be above 0"):
        TrainConfig(lr=0.0)


def test_a_run_is_never_overwritten_by_another_kind_nor_resumed_by_another_method(tmp_path):
    """`--out` naming the teacher's own run (even with --no-resume) is refused, and so is resuming a student with
    another method: each would silently destroy or mix runs."""
    from distill.dmd2 import DMD2Config
    from distill.freeflow import FreeFlowConfig
    from distill.pipeline import distill_student

    teacher = tmp_path / "teacher"
    train_teacher(toy_gaussians(128), NET, TeacherConfig(), TrainConfig(steps=2, batch_size=16), teacher,
                  progress=False)
    quick = TrainConfig(steps=1, batch_size=8)
    with pytest.raises(CheckpointError, match="holds a 'teacher' run; refusing to overwrite it as 'student'"):
        distill_student("freeflow", str(teacher), FreeFlowConfig(), quick, teacher, progress=False, resume=False)
    assert json.loads((teacher / "checkpoint.json").read_text())["kind"] == "teacher"
    student = tmp_path / "student"
    distill_student("freeflow", str(teacher), FreeFlowConfig(), quick, student, progress=False)
    with pytest.raises(CheckpointError, match="holds a freeflow run; refusing to resume it with --method dmd2"):
        distill_student("dmd2", str(teacher), DMD2Config(), TrainConfig(steps=2, batch_size=8), student,
                        progress=False)
    distill_student("dmd2", str(teacher), DMD2Config(), quick, student, progress=False, resume=False)  # starts over


def test_a_resumed_run_logs_each_step_once_and_a_fresh_one_starts_its_log_anew(tmp_path):
    config = lambda steps: TrainConfig(steps=steps, batch_size=16, checkpoint_every=10, log_every=5)
    train_teacher(toy_gaussians(128), NET, TeacherConfig(), config(20), tmp_path, progress=False)
    log = tmp_path / "log.jsonl"
    with log.open("a") as lines:  # logged after the checkpoint at 20, before a crash: trained again on resuming
        lines.write(json.dumps({"step": 25}) + "\n")
    train_teacher(toy_gaussians(128), NET, TeacherConfig(), config(30), tmp_path, progress=False)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [5, 10, 15, 20, 25, 30]
    train_teacher(toy_gaussians(128), NET, TeacherConfig(), config(10), tmp_path, progress=False, resume=False)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [5, 10]


def test_ctrl_c_saves_the_step_reached_and_the_same_command_resumes(tmp_path):
    """SIGINT to `flowmap teacher`: the step under way finishes, a checkpoint is written, one line says so (exit
    130), and the same command goes on from there."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "flowmap.cli", "teacher", "--data", "toy", "--arch", "mlp", "--width", "16",
               "--depth", "1", "--steps", "1000000", "--batch-size", "8", "--log-every", "1", "--checkpoint-every",
               "1000000", "--quiet", "--out", str(tmp_path)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    give_up = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 3):
        assert time.monotonic() < give_up and process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    step = json.loads((tmp_path / "checkpoint.json").read_text())["step"]
    assert process.returncode == 130, stderr
    assert f"interrupted at step {step}; its checkpoint is saved in {tmp_path}" in stderr and "Traceback" not in stderr
    assert json.loads(log.read_text().splitlines()[-1])["step"] == step >= 3


def test_a_method_that_trains_on_data_reads_the_teachers_own_file_or_asks_for_data(tmp_path):
    """Without --data, meanflow trains on the file the teacher was trained on (not on a built-in dataset of the
    same name); a teacher that recorded no file is a clear error naming --data."""
    import numpy as np

    from distill.meanflow import MeanFlowConfig
    from distill.pipeline import distill_student

    images = np.random.default_rng(0).uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "digits.npz", images=images, labels=np.arange(24) % 5)  # named as the built-in, 5 classes
    from distill.data import load_dataset

    teacher = tmp_path / "teacher"
    train_teacher(load_dataset(str(tmp_path / "digits.npz")), NET, TeacherConfig(), TrainConfig(steps=1, batch_size=8),
                  teacher, progress=False)
    quick = TrainConfig(steps=1, batch_size=8)
    summary = distill_student("meanflow", str(teacher), MeanFlowConfig(), quick, tmp_path / "s", progress=False)
    assert summary["step"] == 1
    assert json.loads((tmp_path / "s" / "checkpoint.json").read_text())["data"]["classes"] == [str(i) for i in range(5)]
    with pytest.raises(ValueError, match=r"--data digits: its samples are \[1, 8, 8\] of 10 classes, but the teacher "
                                         r"makes \[1, 8, 8\] of 5"):
        distill_student("meanflow", str(teacher), MeanFlowConfig(), quick, tmp_path / "s3", progress=False,
                        data=load_dataset("digits"))
    meta = json.loads((teacher / "checkpoint.json").read_text())
    del meta["data"]["source"]  # a teacher trained before sources were recorded
    (teacher / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"give --data .* trained on 'digits' \(\[1, 8, 8\], 5 classes\), which is"):
        distill_student("meanflow", str(teacher), MeanFlowConfig(), quick, tmp_path / "s2", progress=False)
