"""Every distillation method on the 2-D toy, and each method's own contract."""

import json

import pytest
import torch

from distill.data import toy_gaussians
from distill.dmd2 import DMD2, DMD2Config
from distill.evaluate import sample_student, sample_teacher
from distill.fgm import FGMConfig
from distill.freeflow import FreeFlowConfig
from distill.fsf_dmd import FSFDMD, FSFDMDConfig
from distill.meanflow import MeanFlowConfig
from distill.methods import METHODS
from distill.models import FakeFlow, Student, load_student, load_teacher
from distill.nets import NetConfig
from distill.pipeline import distill_student
from distill.trainer import Setup, TrainConfig

from toy import SW_BOUND, sliced_wasserstein


@pytest.fixture(scope="module")
def reference(toy_teacher):
    gen = torch.Generator().manual_seed(7)
    eps, label = torch.randn(3000, 2, generator=gen), torch.randint(0, 8, (3000,), generator=gen)
    return eps, label, sample_teacher(load_teacher(str(toy_teacher)), eps, label, 1.0, 100)


# Per method: its config on the toy (guidance 1, the toy's teacher is unguided), steps, and the logged
# regression loss that must fall. FGM's and DMD2's generator losses are gradient surrogates whose
# value means nothing; for them what must fall is the distance to the teacher itself, from the
# starting point (the teacher's one Euler step, > 2x the bound) to below the bound.
CASES = {
    "freeflow": (FreeFlowConfig(guidance_min=1.0, guidance_max=1.0), 500, "pred_mse"),
    "meanflow": (MeanFlowConfig(guidance_min=1.0, guidance_max=1.0), 600, "cd_mse"),
    "fsf-dmd": (FSFDMDConfig(guidance_min=1.0, guidance_max=1.0, dm_guidance_scale=1.0, lambda_dm=0.05), 800, "cd_mse"),
    "fgm": (FGMConfig(guidance_min=1.0, guidance_max=1.0), 500, None),
    "dmd2": (DMD2Config(ttur=2, dm_guidance_scale=1.0), 300, None),
}


def test_every_method_is_tested():
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_matches_the_teacher_in_one_step(method, toy_teacher, reference, tmp_path):
    config, steps, falling = CASES[method]
    eps, label, ref = reference
    start = sliced_wasserstein(sample_student(Student.from_teacher(load_teacher(str(toy_teacher))), eps, label,
                                              1.0, 1), ref)
    assert start > 2 * SW_BOUND
    distill_student(method, str(toy_teacher), config, TrainConfig(steps=steps, lr=1e-3, ema_decay=0.99, log_every=25),
                    tmp_path / method, progress=False, data=toy_gaussians())
    student, meta = load_student(tmp_path / method)
    assert meta["method"] == method
    distance = sliced_wasserstein(sample_student(student, eps, label, 1.0, 1), ref)
    assert distance < SW_BOUND, f"{method}: 1-NFE SW {distance:.4f} vs bound {SW_BOUND} (start {start:.4f})"
    if falling is None:
        return
    log = [json.loads(line) for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    early = sum(r[falling] for r in log[:3]) / 3
    late = sum(r[falling] for r in log[-3:]) / 3
    assert late < early, f"{method}: {falling} went from {early:.4g} to {late:.4g}"


def test_fsf_dmd_fake_side_is_the_ema_generator(toy_teacher):
    teacher = load_teacher(str(toy_teacher))
    student = Student.from_teacher(teacher).requires_grad_(True)
    method = FSFDMD(Setup(student, teacher, FSFDMDConfig(), toy_gaussians(256), batch_size=16))
    # no extra network: the only trainable module is the generator, the only state its EMA copy
    assert set(method.trainable) == {"student"} and set(method.state) == {"fake_ema"}
    ema = method.state["fake_ema"]
    assert type(ema) is Student and not any(isinstance(m, FakeFlow) for m in ema.modules())
    assert not any(p.requires_grad for p in ema.parameters())
    sizes = [sum(p.numel() for p in m.parameters()) for m in (student, ema)]
    assert sizes[0] == sizes[1]
    # the EMA follows the generator with the configured decay
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    method.step = 0
    loss = next(method.losses(torch.Generator().manual_seed(0), {}))[1]
    loss.backward()
    decay = method.config.fake_ema_decay
    for old, new, live in zip(before, ema.parameters(), student.parameters(), strict=True):
        assert torch.allclose(new, decay * old + (1 - decay) * live.detach(), atol=1e-6)


def test_fsf_dmd_warm_up_hands_over_to_the_warmed_flow_map(toy_teacher):
    teacher = load_teacher(str(toy_teacher))
    student = Student.from_teacher(teacher).requires_grad_(True)
    method = FSFDMD(Setup(student, teacher, FSFDMDConfig(warmup_steps=3), toy_gaussians(256), batch_size=16))
    ema = method.state["fake_ema"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)  # the student has moved during the warm-up
    logs = {}
    method.step = 2  # still warming up: consistency only, the fake side is left alone
    next(method.losses(torch.Generator().manual_seed(0), logs))
    assert "dm" not in logs and not torch.equal(next(ema.parameters()), next(student.parameters()))
    method.step = 3  # the switch: the fake side becomes the warmed-up flow map, and DMD starts
    next(method.losses(torch.Generator().manual_seed(0), logs))
    assert "dm" in logs
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), student.parameters(), strict=True))


def test_dmd2_updates_its_fake_network_k_times_per_generator_step(toy_teacher, tmp_path):
    distill_student("dmd2", str(toy_teacher), DMD2Config(ttur=3), TrainConfig(steps=4, batch_size=32),
                    tmp_path / "dmd2", progress=False)
    from distill.checkpoint import load_checkpoint

    tensors = load_checkpoint(tmp_path / "dmd2")[1]
    fake_steps = {float(v) for k, v in tensors.items() if k.startswith("opt.fake.") and k.endswith(".step")}
    student_steps = {float(v) for k, v in tensors.items() if k.startswith("opt.student.") and k.endswith(".step")}
    assert fake_steps == {12.0} and student_steps == {4.0}


def test_dmd2_counts_its_critic_updates(toy_teacher):
    teacher = load_teacher(str(toy_teacher))
    method = DMD2(Setup(Student.from_teacher(teacher).requires_grad_(True), teacher, DMD2Config(ttur=4), batch_size=8))
    names = [name for name, _ in method.losses(torch.Generator().manual_seed(0), {})]
    assert names == ["fake"] * 4 + ["student"] and method.fake_updates == 4


def test_self_teacher_runs_with_no_teacher_at_all(tmp_path):
    config = FSFDMDConfig(self_teacher=True, guidance_min=1.0, guidance_max=1.0, dm_guidance_scale=1.0)
    net = NetConfig(arch="mlp", width=32, depth=1, mlp_ratio=2.0)
    summary = distill_student("fsf-dmd", None, config, TrainConfig(steps=20, batch_size=32, log_every=5),
                              tmp_path / "self", progress=False, data=toy_gaussians(512), net=net)
    student, meta = load_student(tmp_path / "self")
    assert meta["teacher"] is None and summary["step"] == 20
    assert torch.isfinite(sample_student(student, torch.randn(16, 2), torch.zeros(16, dtype=torch.long), 1.0, 1)).all()
    with pytest.raises(ValueError, match="needs a teacher unless --self-teacher"):
        FSFDMD(Setup(student, None, FSFDMDConfig(), toy_gaussians(64), batch_size=4))
    # --init starts a self-taught run from that student, not from a fresh network of another size
    distill_student("fsf-dmd", None, config, TrainConfig(steps=21, batch_size=32), tmp_path / "again",
                    progress=False, data=toy_gaussians(512), init=tmp_path / "self")
    assert load_student(tmp_path / "again")[1]["net"]["width"] == 32
    with pytest.raises(ValueError, match=r"--init .*: its network makes \[2\] samples of 8 classes, but this run's"):
        distill_student("fsf-dmd", None, config, TrainConfig(steps=1, batch_size=8), tmp_path / "other",
                        progress=False, data=toy_gaussians(64, modes=3), init=tmp_path / "self")
    with pytest.raises(ValueError, match="--prompts: only a diffusers teacher"):
        distill_student("fsf-dmd", None, config, TrainConfig(steps=1, batch_size=8), tmp_path / "p",
                        progress=False, data=toy_gaussians(64), prompts=["a cat"])


def test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same_student(tiny_digits_runs, tmp_path,
                                                                                   monkeypatch):
    """Our networks checkpoint block by block: each block runs again in the backward pass, the weights after the
    same steps are the same, and the summary counts the networks (FreeFlow's student and fake flow)."""
    from distill import nets

    forwards = [0]
    plain_forward = nets.Block.forward

    def counted(self, *args):
        forwards[0] += 1
        return plain_forward(self, *args)

    monkeypatch.setattr(nets.Block, "forward", counted)
    train = TrainConfig(steps=2, batch_size=8, lr=1e-2, ema_decay=0.0)
    runs = {}
    for recompute in (False, True):
        forwards[0] = 0
        out = tmp_path / f"recompute-{recompute}"
        summary = distill_student("freeflow", str(tiny_digits_runs / "teacher"), FreeFlowConfig(guidance_max=3.0),
                                  TrainConfig(**{**train.__dict__, "gradient_checkpointing": recompute}), out,
                                  progress=False)
        runs[recompute] = summary["checkpointed_networks"], forwards[0], load_student(out)[0].state_dict()
    (plain, plain_forwards, plain_weights), (checkpointed, checkpointed_forwards, weights) = runs[False], runs[True]
    assert plain == 0 and checkpointed == 2
    assert checkpointed_forwards > plain_forwards  # the blocks of the trained networks ran again in backward
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, msg=name)
    # a JVP cannot run through recomputed blocks: refused before anything loads, naming the way out
    with pytest.raises(ValueError, match="--gradient-checkpointing cannot recompute the blocks under a JVP"):
        distill_student("meanflow", str(tiny_digits_runs / "teacher"), MeanFlowConfig(derivative="jvp"),
                        TrainConfig(gradient_checkpointing=True), tmp_path / "meanflow", progress=False)
    with pytest.raises(ValueError, match="--gradient-checkpointing: FGM freezes its online flow for one loss"):
        distill_student("fgm", str(tiny_digits_runs / "teacher"), FGMConfig(), TrainConfig(gradient_checkpointing=True),
                        tmp_path / "fgm", progress=False)

