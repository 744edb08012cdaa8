"""Write a bundle: the student at each baked guidance scale, the guided teacher, the verifier, and a
manifest with shapes, classes, hashes and provenance. Every graph is checked before it is listed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from distill.checkpoint import checkpoint_meta
from distill.diffusers_models import DiffusersConfig
from distill.flow import check_guidance_scale
from distill.models import load_student, load_teacher, signature
from distill.text import load_conditioner
from distill.verifier import load_verifier
from export.bundle import GraphEntry, Manifest, read_bundle, sha256_of, takes_negative
from export.decoder import DECODER_PARITY_BATCHES, DECODER_TOLERANCE, DecoderGraph, load_vae
from export.onnx_export import (
    BATCH_AXIS_MAX,
    PARITY_BATCHES,
    NegativeTeacherGraph,
    StudentGraph,
    TeacherGraph,
    VerifierGraph,
    check_graph,
    example_inputs,
    export_onnx,
    external_data_file,
)
from export.programs import batch_limit, check_program, program_file, save_program, trace_program
from export.scorer import load_clip_scorer, scorer_inputs
from export.text import export_text, random_ids

TEXT_PARITY_BATCHES = (1, 3)  # text encoders are the largest graphs of a text bundle; batch 64 is slow on a CPU


def source_commit(repo: str | Path = ".") -> str:
    """The git commit the bundle was made from, marked `-dirty` when its source has changes.

    The pipeline's own outputs (reports, the bundle, the README tables) are left out of the check:
    they change while `make models` runs and do not shape the graphs.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!docs", ":!models", ":!README.md"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scale_tag(guidance_scale: float) -> str:
    return f"{guidance_scale:g}"


def trained_guidance(method_config: dict) -> tuple[float, float] | None:
    """The guidance scales a student was distilled at, (lowest, highest), from its method's config: a range
    (FreeFlow, FGM, MeanFlow, FSF-DMD) or one scale (DMD2); None where the config names none."""
    if "guidance_min" in method_config:
        return float(method_config["guidance_min"]), float(method_config["guidance_max"])
    if "dm_guidance_scale" in method_config:
        return (float(method_config["dm_guidance_scale"]),) * 2
    return None


def check_trained_guidance(method_config: dict, guidance_scales: tuple[float, ...]) -> None:
    """Refuse to bake a guidance scale the student was never distilled at: its graph would serve images no
    loss ever shaped."""
    trained = trained_guidance(method_config)
    if trained is None:
        return
    low, high = trained
    outside = [scale for scale in guidance_scales if not low - 1e-6 <= scale <= high + 1e-6]
    if outside:
        span = f"{low:g}" if low == high else f"{low:g}..{high:g}"
        raise ValueError(f"--guidance-scales {' '.join(f'{s:g}' for s in outside)}: the student was distilled at "
                         f"guidance {span} only; bake scales in that range, or distil again with --guidance-min/"
                         "--guidance-max (FreeFlow, FGM, MeanFlow, FSF-DMD) or --dm-guidance-scale (DMD2) covering "
                         "them")


def check_student_of(student, student_meta: dict, student_dir, teacher, teacher_spec: str) -> None:
    """Refuse a student distilled from another kind of teacher: its graphs would not fit the teacher's, and the
    export would fail deep in a trace (or, worse, succeed)."""
    ours, theirs = signature(student.config), signature(getattr(teacher, "config", None))
    if not theirs:  # a teacher of the user's own, without our config: nothing to compare
        return
    differs = [f"{name} {ours[name]} (student) against {theirs[name]} (teacher)"
               for name in sorted(ours.keys() & theirs.keys()) if ours[name] != theirs[name]]
    if ("family" in ours) != ("family" in theirs):
        differs.append("one is a text (diffusers) model, the other a class one")
    if differs:
        origin = student_meta.get("teacher")
        raise ValueError(f"--student {student_dir}{f' was distilled from {origin}, and' if origin else ''} does not "
                         f"fit --teacher {teacher_spec}: {'; '.join(differs)}")


def check_scale_names(scales: tuple[float, ...], flag: str = "--guidance-scales") -> None:
    """Refuse scales that would write one file name twice (1.2 and 1.2000001 both print as 1.2)."""
    tags = [scale_tag(scale) for scale in scales]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        raise ValueError(f"{flag}: {', '.join(repeated)} given more than once (scales are named to 6 significant "
                         "digits)")


def export_bundle(student_dir: str | Path, teacher_spec: str, verifier_dir: str | Path | None, out: str | Path,
                  guidance_scales: tuple[float, ...] = (1.5,), teacher_guidance_scale: float | None = None,
                  name: str | None = None, metrics: dict | None = None, progress: bool = True,
                  decoder: str | Path | None = None, external_data: bool | None = None,
                  programs: bool = False, parity_batches: tuple[int, ...] = PARITY_BATCHES) -> Manifest:
    """Export and check all graphs into `out`, then write `manifest.json` and re-read it.

    `teacher_guidance_scale` defaults to the first student scale. `metrics` (an evaluation result) goes into
    the provenance so the README's tables can be generated from the shipped bundle. With `decoder` (a
    diffusers autoencoder folder), the student and teacher work on latents, the decoder graph turns
    them into images, and the verifier scores those images (a format 2 bundle). Graphs whose weights
    pass EXTERNAL_DATA_BYTES keep them in `<graph>.onnx.data` (protobuf holds 2 GB at most); `external_data`
    forces that on or off. A diffusers teacher (`diffusers:FOLDER`) makes a text bundle: its tokenizers and
    text encoders go in as the conditioning, its `vae/` (if it has one) as the decoder unless `decoder`
    names another, and the verifier is optional (without one the bundle serves no search). With
    `programs`, each graph is also saved as a torch.export program (`.pt2`, parity-checked), which the
    torch serving backend loads. `parity_batches` are the batch sizes the denoisers and a class verifier are
    checked at against torch (the largest one also for batch invariance): fewer and smaller ones for a model
    whose batch of 64 a CPU cannot afford; a decoder, text encoders and a CLIP scorer are checked at 1 and 3.
    """
    if not guidance_scales:
        raise ValueError("at least one guidance scale must be baked (--guidance-scales)")
    if not parity_batches or min(parity_batches) < 1:
        raise ValueError(f"--parity-batches: batch sizes are 1 or more, got {list(parity_batches)}")
    check_scale_names(guidance_scales)
    for scale in guidance_scales:
        check_guidance_scale("--guidance-scales", scale)
    if teacher_guidance_scale is not None:
        check_guidance_scale("--teacher-guidance-scale", teacher_guidance_scale)
    student, student_meta = load_student(student_dir)
    check_trained_guidance(student_meta.get("method_config") or {}, guidance_scales)
    out = Path(out)
    teacher = load_teacher(teacher_spec)
    check_student_of(student, student_meta, student_dir, teacher, teacher_spec)
    text = isinstance(getattr(teacher, "config", None), DiffusersConfig)
    if verifier_dir is None and not text:
        raise ValueError("a class-conditional bundle needs --verifier (search scores with it)")
    verifier_meta = checkpoint_meta(verifier_dir) if not text else None  # read once: classes, shape, provenance
    scorer = scorer_tokenizer = None
    if text and verifier_dir is not None:
        if not str(verifier_dir).startswith("clip:"):
            raise ValueError("a text bundle's verifier scores images against prompts: --verifier clip:FOLDER (a "
                             "transformers CLIPModel and its tokenizer, save_pretrained); ours score classes")
        scorer, scorer_tokenizer = load_clip_scorer(str(verifier_dir)[len("clip:"):])
    if text:
        conditioner, tokenizers = load_conditioner(teacher.config.path)
        draw_ids = random_ids(conditioner)
        conditions = lambda batch, generator: conditioner(*draw_ids(batch, generator))
        pipeline_vae = Path(teacher.config.path) / "vae"  # absent for a pixel-space pipeline
        if decoder is None and not pipeline_vae.is_dir() and "vae" in pipeline_parts(teacher.config.path):
            raise ValueError(f"{teacher.config.path}/model_index.json names a vae, but {pipeline_vae} is missing: "
                             "put it back, or give the decoder with --decoder FOLDER")
        decoder = decoder if decoder is not None else pipeline_vae if pipeline_vae.is_dir() else None
        classes = []
    else:
        conditions = None
        verifier_classes = verifier_meta["data"]["classes"]
        if len(verifier_classes) != teacher.num_classes:
            raise ValueError(f"--verifier {verifier_dir} scores {len(verifier_classes)} classes, but the teacher "
                             f"generates {teacher.num_classes}: train the verifier on data of the teacher's classes")
        classes = list((student_meta.get("data") or {}).get("classes") or verifier_classes)
    # the student's own shape: a data-free student of a latent teacher (SiT) has no data of its own
    sample_shape = tuple(student.config.shape)
    if len(sample_shape) != 3:
        raise ValueError(f"bundles serve images [C, H, W]; this model's data shape is {sample_shape}")
    decoder_graph = DecoderGraph(load_vae(decoder)) if decoder is not None else None
    try:
        image_shape = decoder_graph.image_shape(sample_shape) if decoder_graph else sample_shape
    except RuntimeError as err:  # latents of other channels than the decoder's
        raise ValueError(f"--decoder {decoder} does not decode the student's {list(sample_shape)} latents: "
                         f"{str(err).splitlines()[0]}") from None
    verifier = load_verifier(verifier_dir) if verifier_dir is not None and not text else None
    verifier_shape = tuple(verifier_meta["data"]["shape"]) if verifier else image_shape
    if verifier_shape != image_shape:
        decoded = " (the decoder's output)" if decoder_graph else ""
        raise ValueError(f"the verifier scores the served images, {list(image_shape)}{decoded}, but {verifier_dir} was "
                         f"trained on {list(verifier_shape)}")
    teacher_guidance_scale = float(teacher_guidance_scale if teacher_guidance_scale is not None else guidance_scales[0])
    # every check passed: the graphs go to a staging folder that replaces `out` whole once all of them pass theirs,
    # so a failed export leaves neither a half bundle nor one exported before mixed with this one's files
    final = out
    with staged_bundle(final) as out:
        checks = {}

        def build(graph, filename, label, guidance_scale=None, shape=sample_shape, make=None, **check) -> GraphEntry:
            check.setdefault("batches", tuple(parity_batches))
            make = make or (lambda batch, g=graph: example_inputs(g, batch, shape, len(classes), seed=batch,
                                                                  conditions=conditions))
            example, program, traced = make(2), None, None
            if programs:
                traced = trace_program(graph, example)
                program_path = save_program(traced, graph, example, out / program_file(filename))
                checks[program_path.name] = check_program(graph, program_path, make, label, **check)
                program = GraphEntry(program_path.name, sha256_of(program_path))
                if batch_limit(traced) < BATCH_AXIS_MAX:  # narrowed to one branch: the ONNX exporter traces its own way
                    traced = None
            # one trace for both files
            path = export_onnx(graph, example, out / filename, external_data, program=traced)
            checks[filename] = check_graph(graph, path, make, label, **check)
            if progress:
                print(f"  exported {filename}: parity and batch invariance within tolerance", flush=True)
            data = external_data_file(path)
            data_entry = GraphEntry(data.name, sha256_of(data)) if data.is_file() else None
            return GraphEntry(filename, sha256_of(path), guidance_scale, data_entry, program)

        students = [build(StudentGraph(student, scale), f"student_w{scale_tag(scale)}.onnx",
                          f"student graph (w={scale:g})", float(scale)) for scale in guidance_scales]
        teacher_graph = (NegativeTeacherGraph if takes_negative(text, teacher_guidance_scale) else TeacherGraph)
        teacher_entry = build(teacher_graph(teacher, teacher_guidance_scale),
                              f"teacher_w{scale_tag(teacher_guidance_scale)}.onnx",
                              f"teacher graph (w={teacher_guidance_scale:g})", teacher_guidance_scale)
        verifier_entry = build(VerifierGraph(verifier), "verifier.onnx", "verifier graph",
                               shape=image_shape) if verifier else None
        if scorer:
            verifier_entry = build(scorer, "verifier.onnx", "verifier graph (text-image score)",
                                   make=scorer_inputs(scorer, scorer_tokenizer, image_shape),
                                   batches=TEXT_PARITY_BATCHES)
        decoder_entry = build(decoder_graph, "decoder.onnx", "decoder graph", batches=DECODER_PARITY_BATCHES,
                              tolerance=DECODER_TOLERANCE) if decoder_graph else None
        text_entry = None
        if text:
            build_text = lambda graph, filename, label, make: build(graph, filename, label, make=make,
                                                                   batches=TEXT_PARITY_BATCHES)
            text_entry = export_text(conditioner, tokenizers, out, build_text, teacher.null[0], scorer_tokenizer)

        manifest = Manifest(
            name=name or final.name, image_shape=image_shape, classes=classes, students=students, teacher=teacher_entry,
            verifier=verifier_entry, decoder=decoder_entry, latent_shape=sample_shape if decoder_graph else None,
            text=text_entry,
            provenance={
                "method": student_meta.get("method"),
                "steps": student_meta.get("step"),
                "source_commit": source_commit(),
                "student": {k: student_meta.get(k) for k in ("method_config", "net", "train")},
                "teacher": _meta_of(teacher_spec),
                "verifier": ({k: v for k, v in verifier_meta.items() if k in ("verifier", "train")}
                             if verifier else {"scorer": str(verifier_dir)} if scorer else None),
                "checks": checks,
                "metrics": metrics or {},
            })
        if decoder_graph:
            manifest.provenance["decoder"] = {"folder": str(decoder), "scale": decoder_graph.scale,
                                              "shift": decoder_graph.shift}
        manifest.save(out)
        read_bundle(out)  # the bundle we wrote must pass the server's own reader
    return manifest


def pipeline_parts(folder: str | Path) -> set[str]:
    """The parts a diffusers pipeline folder's model_index.json names (vae, text_encoder, ...)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name for name, value in index.items() if isinstance(value, list)}


@contextlib.contextmanager
def staged_bundle(out: Path):
    """A fresh folder beside `out` to export into; on success it becomes `out` (a bundle there before is replaced
    whole), on failure it is removed. A folder `out` holding anything but a bundle is refused, not emptied."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ValueError(f"--out {out} holds files but no bundle (manifest.json): give an empty or new folder")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed export left
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def _meta_of(teacher_spec: str) -> dict:
    if Path(teacher_spec).is_dir():
        meta = checkpoint_meta(teacher_spec)
        return {k: meta.get(k) for k in ("net", "teacher", "train", "step")}
    return {"factory": teacher_spec}
