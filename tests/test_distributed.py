"""Data-parallel training: two CPU processes with the gloo backend, on the 2-D toy."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from distill.data import toy_gaussians
from distill.meanflow import MeanFlow, MeanFlowConfig
from distill.models import Student, load_teacher
from distill.nets import NetConfig
from distill.pipeline import train_teacher
from distill.teacher import TeacherConfig
from distill.trainer import Setup, TrainConfig, rank_seed, seeded, train

from serving import ROOT, free_port

NET = NetConfig(arch="mlp", width=32, depth=1, mlp_ratio=2.0)
GLOBAL_BATCH, SEED = 64, 3
CFG = MeanFlowConfig(derivative="jvp", guidance_min=1.0, guidance_max=1.5)  # the JVP path: gradients still synchronised


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "teacher"
    train_teacher(toy_gaussians(1024), NET, TeacherConfig(), TrainConfig(steps=150, batch_size=128, lr=2e-3), out,
                  progress=False)
    return out


def fresh_method(teacher_dir, batch: int) -> MeanFlow:
    teacher = load_teacher(str(teacher_dir))
    with seeded(SEED):  # the same initial student in every process, as distill_student builds it
        student = Student.from_teacher(teacher).requires_grad_(True)
    return MeanFlow(Setup(student, teacher, CFG, toy_gaussians(1024), batch))


def _worker(rank: int, world: int, port: int, teacher_dir, out_dir, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    method = fresh_method(teacher_dir, GLOBAL_BATCH // world)
    train(method, out_dir / "run", {"kind": "student"}, TrainConfig(steps=steps, lr=1e-3, seed=SEED, ema_decay=0.0),
          resume=False, progress=False)
    torch.save(method.trainable["student"].state_dict(), out_dir / f"rank{rank}.pt")
    # no rank tears down while another still works: once in a full suite rank 1 aborted ("terminate called without an
    # active exception") as the group went down around it
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_two_ranks(teacher_dir, out_dir, steps: int) -> list[dict]:
    mp.spawn(_worker, args=(2, free_port(), teacher_dir, out_dir, steps), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_stay_identical(teacher_dir, tmp_path):
    first, second = run_two_ranks(teacher_dir, tmp_path, steps=4)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    start = Student.from_teacher(load_teacher(str(teacher_dir))).state_dict()
    assert any(not torch.equal(first[k], start[k]) for k in first)  # and they did train
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4


def test_one_step_on_two_ranks_equals_one_step_on_the_whole_batch(teacher_dir, tmp_path):
    ranks = run_two_ranks(teacher_dir, tmp_path, steps=1)
    # One process, one step, over the same B samples: the two ranks' halves, drawn from the same
    # per-rank seeds; the objective is a per-sample mean, so the batch-B gradient is the halves' mean.
    method = fresh_method(teacher_dir, GLOBAL_BATCH // 2)
    student = method.trainable["student"]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    optimizer.zero_grad()
    for rank in range(2):
        generator = torch.Generator().manual_seed(rank_seed(SEED, rank))
        for _, loss in method.losses(generator, {}):
            (loss / 2).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    reference = student.state_dict()
    worst = max((ranks[0][k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-6, f"two ranks differ from the single-process step by {worst:.3g}"


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this Python")
def test_torchrun_entry_point_checkpoints_on_rank_0_and_resumes(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "teacher"

    def launch(steps: int) -> dict:
        # --standalone: torchrun binds a port the OS picks (a free port chosen here could be taken by a test beside
        # it before torchrun binds it)
        command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "flowmap.cli", "teacher",
                   "--data", "toy", "--arch", "mlp", "--width", "32", "--depth", "1", "--steps", str(steps),
                   "--batch-size", "64", "--checkpoint-every", "1000", "--out", str(out), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"torchrun exited with {run.returncode}:\n{run.stderr[-3000:]}"
        return json.loads((out / "summary.json").read_text())

    first = launch(4)
    assert first["world_size"] == 2 and first["step"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4]  # one writer: rank 0
    resumed = launch(7)
    assert resumed["step"] == 7 and resumed["steps_this_run"] == 3
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["world_size"] == 2
    from distill.checkpoint import load_checkpoint

    tensors = load_checkpoint(out)[1]
    assert "rng.torch" in tensors and "rng.torch.rank1" in tensors  # every rank's RNG, for exact resumes
