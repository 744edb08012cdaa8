import sys
from pathlib import Path

import pytest

# tests import their helpers (serving.py) by name
sys.path.insert(0, str(Path(__file__).parent))


def built_once(tmp_path_factory, name: str, build):
    """`build(folder)`'s value, built once for the whole `make test`: its two pytest-xdist workers share one folder,
    and the second to ask waits for the first to finish building instead of building its own (the text bundles
    take a minute). Without xdist: built in this session's temporary folder."""
    import fcntl
    import os
    import pickle
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above each worker's own
    folder, value_file = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker that holds it dies
        if not value_file.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that died while building left
            folder.mkdir(parents=True)
            value = build(folder)
            value_file.write_bytes(pickle.dumps(value))
        return pickle.loads(value_file.read_bytes())


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    """A flow-matching teacher of the 2-D toy, trained once for every test that distils from it."""
    from distill.data import toy_gaussians
    from distill.pipeline import train_teacher
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig

    from toy import TOY_NET

    out = tmp_path_factory.mktemp("toy") / "teacher"
    train_teacher(toy_gaussians(), TOY_NET, TeacherConfig(), TrainConfig(steps=1500, lr=2e-3, ema_decay=0.99),
                  out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_digits_runs(tmp_path_factory):
    """teacher/, verifier/ and freeflow/ of a tiny digits MLP, three steps each (ema 0: the live weights,
    so three steps really move the student's zero-initialised s and w embeddings)."""
    from distill.data import load_digits
    from distill.freeflow import FreeFlowConfig
    from distill.nets import NetConfig
    from distill.pipeline import distill_student, train_teacher, train_verifier
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig
    from distill.verifier import VerifierConfig

    root = tmp_path_factory.mktemp("runs")
    data = load_digits()
    quick = TrainConfig(steps=3, batch_size=16, lr=1e-2, ema_decay=0.0)
    train_teacher(data, NetConfig(arch="mlp", width=32, depth=1, mlp_ratio=2.0), TeacherConfig(), quick,
                  root / "teacher", progress=False)
    train_verifier(data, VerifierConfig(width=8, feature_dim=16), quick, root / "verifier", progress=False)
    # over the scales the tests bake (1.5 and 3)
    distill_student("freeflow", str(root / "teacher"), FreeFlowConfig(guidance_max=3.0), quick, root / "freeflow",
                    progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_latent(tmp_path_factory):
    """(bundle, runs, VAE folders) of a tiny latent bundle (format 2, with a decoder), built once."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (the train extra)")
    from tiny_latent import build_latent_bundle

    return built_once(tmp_path_factory, "tiny-latent", build_latent_bundle)


@pytest.fixture(scope="session")
def tiny_text_pipelines(tmp_path_factory):
    """{family: folder} of tiny random SD3, FLUX and SANA pipelines in the diffusers layout, built once."""
    pytest.importorskip("transformers", reason="transformers is not installed (the train extra)")
    from tiny_text import FAMILIES, tiny_pipeline

    return built_once(tmp_path_factory, "tiny-text",
                      lambda root: {family: tiny_pipeline(family, root / family) for family in FAMILIES})


@pytest.fixture(scope="session")
def tiny_text_bundles(tiny_text_pipelines, tmp_path_factory):
    """{family: (bundle, student run)}: each tiny pipeline distilled by two FreeFlow steps on prompts and
    exported as a text bundle (student at w=1 and 2, teacher at 2 (FLUX: 1), tokenizers, text encoder, decoder;
    SD3's with a tiny CLIP as its verifier, in root/clip; SANA's with torch programs too, which the torch backend
    serves)."""
    from distill.freeflow import FreeFlowConfig
    from distill.pipeline import distill_student
    from distill.trainer import TrainConfig
    from export.writer import export_bundle

    from tiny_text import CAPTIONS, tiny_clip

    def build(root):
        bundles = {}
        for family, folder in tiny_text_pipelines.items():
            run = root / f"{family}-student"
            distill_student("freeflow", f"diffusers:{folder}", FreeFlowConfig(), TrainConfig(steps=2, batch_size=4),
                            run, progress=False, prompts=CAPTIONS)
            # SD3's bundle carries a CLIP scorer as its verifier (search); the others serve without one
            scorer = f"clip:{tiny_clip(root / 'clip')}" if family == "sd3" else None
            # teachers with guidance 2 take negative prompts; FLUX-dev style has its guidance embedded (w = 1)
            export_bundle(run, f"diffusers:{folder}", scorer, root / family, (1.0, 2.0),
                          teacher_guidance_scale=1.0 if family == "flux" else 2.0, progress=False,
                          programs=family == "sana")
            bundles[family] = (root / family, run)
        return bundles

    return built_once(tmp_path_factory, "text-bundles", build)


@pytest.fixture(scope="session")
def sana_program_bundle(tiny_text_bundles):
    """The tiny SANA text bundle, whose graphs (text encoder, negative-prompt teacher, DC-AE decoder) have torch
    programs: a text bundle the torch backend serves."""
    return tiny_text_bundles["sana"][0]
