"""diffusers text-to-image transformers (SD3, FLUX, SANA) as teachers and students, checked against the
real diffusers pipelines on tiny random models."""

from dataclasses import replace

import pytest
import torch

from distill.checkpoint import CheckpointError
from distill.diffusers_models import pack_latents, unpack_latents
from distill.flow import guided_velocity, null_condition
from distill.models import load_student, load_teacher
from distill.text import encode_prompts, load_conditioner

from tiny_text import CAPTIONS, FAMILIES

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_teacher_follows_the_diffusers_pipeline(tiny_text_pipelines, family):
    """Prompt encoding, latent layout, timestep scale, velocity sign and guidance against the family's own
    pipeline and FlowMatchEulerDiscreteScheduler: three Euler steps land on the same latents."""
    folder = tiny_text_pipelines[family]
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(folder)
    teacher = load_teacher(f"diffusers:{folder}")
    x = torch.randn(1, *teacher.config.shape, generator=torch.Generator().manual_seed(0))
    # FLUX-dev style: guidance is the transformer's input (our teacher's embedded guidance), no CFG pass
    guidance_scale = 1.0 if family == "flux" else 2.0
    extra = {"sana": {"use_resolution_binning": False, "complex_human_instruction": None}}.get(family, {})
    prompt = "a cat"  # shorter than the token limit: the padding (and SANA's mask over it) matters
    out = pipe(prompt=prompt, num_inference_steps=3, output_type="latent", height=32, width=32,
               max_sequence_length=10, guidance_scale=teacher.config.embedded_guidance if family == "flux"
               else guidance_scale, latents=pack_latents(x) if family == "flux" else x.clone(), **extra).images
    if family == "flux":
        out = unpack_latents(out, teacher.config.shape)
    condition = encode_prompts(*load_conditioner(folder), [prompt])
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = torch.full((1,), float(sigma))
            x = x - (sigma - sigma_next) * guided_velocity(teacher.velocity, x, t, condition, guidance_scale,
                                                           null_condition(teacher, condition))
    assert torch.allclose(x, out, atol=1e-5), (x - out).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_student_starts_as_the_teachers_euler_step(tiny_text_pipelines, family):
    teacher = load_teacher(f"diffusers:{tiny_text_pipelines[family]}", prompts=CAPTIONS)
    student = teacher.make_student()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, *teacher.config.shape, generator=generator)
    t, s, w = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([0.0, 0.5, 0.1]), torch.tensor([1.0, 2.0, 4.0])
    condition = teacher.sample_conditions(3, generator)
    with torch.no_grad():
        euler = x - (t - s)[:, None, None, None] * teacher.velocity(x, t, condition)
        assert torch.allclose(student.jump(x, t, s, condition, w), euler, atol=1e-5)
        for embed in student.extra_embed.values():  # the s and w embeddings reach the output once trained
            for parameter in embed.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        moved = student.jump(x, t, s, condition, w)
        assert not torch.allclose(moved, euler, atol=1e-3)
        assert not torch.allclose(student.jump(x, t, s, condition, w + 1.0), moved, atol=1e-4)  # w reaches it
        assert not torch.allclose(student.jump(x, t, s + 0.05, condition, w), moved, atol=1e-4)  # and t - s


@pytest.mark.parametrize("family", FAMILIES)
def test_the_jvp_runs_through_a_diffusers_transformer(tiny_text_pipelines, family):
    """MeanFlow's JVP through a transformer whose attention calls torch's fused kernels, which have no
    forward-mode derivative: it runs, and agrees with a central difference."""
    from distill.meanflow import total_derivative

    teacher = load_teacher(f"diffusers:{tiny_text_pipelines[family]}", prompts=CAPTIONS)
    student = teacher.make_student()
    generator = torch.Generator().manual_seed(2)
    x, direction = (torch.randn(2, *teacher.config.shape, generator=generator) for _ in range(2))
    t, s, w = torch.tensor([0.9, 0.6]), torch.tensor([0.2, 0.1]), torch.tensor([1.0, 2.0])
    condition = teacher.sample_conditions(2, generator)
    _, by_jvp = total_derivative(student, x, t, s, condition, w, direction, "jvp", 1e-3)
    # a step of 3e-5, not the default 1e-3: the transformer takes 1000 t, whose fastest embedding
    # frequencies a step of 1e-3 cannot follow
    _, by_difference = total_derivative(student, x, t, s, condition, w, direction, "fd", 3e-5)
    scale = by_jvp.abs().max()
    assert scale > 1e-3 and (by_jvp - by_difference).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("method", ["freeflow", "fgm", "dmd2"])  # the data-free methods
def test_data_free_methods_distil_a_diffusers_teacher_from_prompts(tiny_text_pipelines, tmp_path, method):
    from distill.methods import get_method
    from distill.pipeline import distill_student
    from distill.trainer import TrainConfig

    folder = tiny_text_pipelines["sana"]
    train = TrainConfig(steps=3, batch_size=4, lr=1e-3, ema_decay=0.0, log_every=1)
    distill_student(method, f"diffusers:{folder}", get_method(method).config(), train, tmp_path / "student",
                    progress=False, prompts=CAPTIONS)
    student, meta = load_student(tmp_path / "student")
    teacher = load_teacher(f"diffusers:{folder}", prompts=CAPTIONS)
    assert meta["prompts"] == len(CAPTIONS) and meta["net"]["family"] == "sana"
    if method == "freeflow":  # resumed on other prompts, the run would mix two trainings: refused by name
        with pytest.raises(CheckpointError, match="trained on other prompts"):
            distill_student(method, f"diffusers:{folder}", get_method(method).config(), replace(train, steps=4),
                            tmp_path / "student", progress=False, prompts=CAPTIONS[::-1])
    x = torch.randn(2, *teacher.config.shape, generator=torch.Generator().manual_seed(2))
    one, zero = torch.ones(2), torch.zeros(2)
    with torch.no_grad():
        moved = student.jump(x, one, zero, teacher.bank[:2], torch.full((2,), 1.5))
        start = teacher.make_student().jump(x, one, zero, teacher.bank[:2], torch.full((2,), 1.5))
    assert torch.isfinite(moved).all() and not torch.allclose(moved, start, atol=1e-6)  # it trained


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_trains_the_same_diffusers_student(tiny_text_pipelines, tmp_path, family):
    """With --gradient-checkpointing the student's and the fake flow's transformers recompute their blocks'
    activations in the backward pass (diffusers' own checkpointing, turned on in each): the same weights after
    the same steps, for every family."""
    from distill.freeflow import FreeFlowConfig
    from distill.pipeline import distill_student
    from distill.trainer import TrainConfig

    train = TrainConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.0)
    runs = {}
    for recompute in (False, True):
        out = tmp_path / f"recompute-{recompute}"
        summary = distill_student("freeflow", f"diffusers:{tiny_text_pipelines[family]}", FreeFlowConfig(),
                                  replace(train, gradient_checkpointing=recompute), out, progress=False,
                                  prompts=CAPTIONS)
        runs[recompute] = summary["checkpointed_networks"], load_student(out)[0].state_dict()
    assert runs[False][0] == 0 and runs[True][0] == 2  # the student's transformer and the fake flow's
    for name, weights in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weights, atol=1e-5, rtol=1e-4, msg=name)


def test_methods_that_need_data_say_so_for_diffusers_teachers(tiny_text_pipelines, tmp_path):
    from distill.meanflow import MeanFlowConfig
    from distill.pipeline import distill_student
    from distill.trainer import TrainConfig

    with pytest.raises(ValueError, match="image-caption"):
        distill_student("meanflow", f"diffusers:{tiny_text_pipelines['sd3']}", MeanFlowConfig(), TrainConfig(),
                        tmp_path, prompts=CAPTIONS)


def test_a_missing_part_of_a_pipeline_is_named_and_never_looked_up_online(tiny_text_pipelines, tmp_path):
    """A folder missing from a pipeline (or a CLIP verifier that is not there) is a one-line error naming it: the
    Hugging Face Hub is never asked for it."""
    import shutil

    from distill.text import load_conditioner
    from export.scorer import load_clip_scorer

    folder = tmp_path / "sd3"
    shutil.copytree(tiny_text_pipelines["sd3"], folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=f"the pipeline's tokenizer_2: no folder {folder}/tokenizer_2 .*nothing "
                                                "is downloaded"):
        load_conditioner(folder)
    with pytest.raises(FileNotFoundError, match="--verifier clip:FOLDER: no folder openai/clip-vit-large-patch14"):
        load_clip_scorer("openai/clip-vit-large-patch14")
