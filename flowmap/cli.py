"""`flowmap`: the command line. Flags are generated from the typed config dataclasses, so every
config field is a flag with the same name and default. Heavy imports happen inside each command,
so `flowmap serve` never imports torch."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

# the forms distill.models.load_teacher reads
TEACHER_HELP = ("teacher run directory, sit:FILE (a public SiT checkpoint, e.g. SiT-XL-2-256x256.pt; not DiT's, "
                "which predict DDPM noise), diffusers:FOLDER (an SD3, FLUX or SANA pipeline saved with "
                "save_pretrained) or package.module:factory (the student then needs --init)")


def field_help(cls) -> dict[str, str]:
    """Each dataclass field's comment, from the class source: the comment on the field's line, or the
    comment lines right above it (for a subclass, its own fields' comments over its parents')."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        pending: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("# "))
                continue
            field = re.match(r"(\w+)\s*:[^=]*=.*?(?:#\s*(.*))?$", stripped)
            if field and not stripped.startswith(("def ", "return")):
                text = " ".join([*pending, field.group(2) or ""]).strip()
                if text:
                    notes[field.group(1)] = text
            pending = []
    return notes


# Earlier spellings of renamed flags, still accepted (`cfg` meant classifier-free guidance).
FLAG_ALIASES = {"guidance_min": "--cfg-min", "guidance_max": "--cfg-max", "guidance_scale": "--cfg-scale",
                "dm_guidance_scale": "--dm-cfg-scale"}


def add_config_flags(parser: argparse.ArgumentParser, cls, defaults=None, skip=(), title=None) -> None:
    """One `--field-name` flag per dataclass field, typed and defaulted from `defaults` (an instance),
    explained by the field's comment in the source."""
    group = parser.add_argument_group(title or cls.__name__)
    hints, notes = typing.get_type_hints(cls), field_help(cls)
    defaults = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, default, kind = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), hints[f.name]
        flags = (flag, *([FLAG_ALIASES[f.name]] if f.name in FLAG_ALIASES else []))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        shown = " ".join(map(str, default)) if origin is tuple else default
        note = notes.get(f.name, "").replace("%", "%%")
        text = f"{note}; default: {shown}" if note else f"default: {shown}"
        if kind is bool:
            group.add_argument(*flags, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=text)
        elif origin is tuple:
            group.add_argument(*flags, dest=f.name, default=default, nargs="+", type=args[0], help=text)
        elif kind in (int, float, str):
            group.add_argument(*flags, dest=f.name, default=default, type=kind, help=text)
        elif args and type(None) in args:  # Optional[x]
            inner = next(a for a in args if a is not type(None))
            group.add_argument(*flags, dest=f.name, default=default, type=inner, help=text)


def config_from(args: argparse.Namespace, cls, defaults=None, **overrides):
    """Build a `cls` from parsed flags (fields without a flag keep `defaults`' values)."""
    defaults = defaults if defaults is not None else cls()
    values = {f.name: getattr(args, f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
    values.update(overrides)
    return cls(**values)


def trained(summary: dict) -> int:
    """Print a training command's summary; its exit status is 0 where the run reached its last step and
    STOPPED_EARLY where --max-minutes stopped it first, so a script that goes on to export does not export a
    network short of its steps unawares."""
    from distill.trainer import STOPPED_EARLY

    print(summary)
    if summary.get("finished", True):
        return 0
    print(f"stopped at step {summary['step']}, before the last (--max-minutes): its checkpoint is saved, and the "
          f"same command without --no-resume trains on from there (exit status {STOPPED_EARLY})", file=sys.stderr)
    return STOPPED_EARLY


def _train_flags(parser, defaults) -> None:
    from distill.trainer import TrainConfig

    add_config_flags(parser, TrainConfig, defaults, title="training")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_teacher(argv: list[str]) -> int:
    from distill.data import load_dataset
    from distill.nets import NetConfig
    from distill.pipeline import train_teacher
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig
    from flowmap.recipe import Recipe

    recipe = Recipe()
    parser = argparse.ArgumentParser("flowmap teacher",
                                     description="Train a flow-matching teacher (docs/methods.md §1).")
    parser.add_argument("--data", default="digits", help="'digits', 'toy', an .npz or a folder of class folders")
    parser.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint)")
    add_config_flags(parser, NetConfig, recipe.net, skip=("shape", "num_classes", "extras"), title="network")
    add_config_flags(parser, TeacherConfig, recipe.teacher, title="teacher")
    _train_flags(parser, recipe.teacher_train)
    args = parser.parse_args(argv)
    summary = train_teacher(load_dataset(args.data), config_from(args, NetConfig, recipe.net),
                            config_from(args, TeacherConfig), config_from(args, TrainConfig, recipe.teacher_train),
                            args.out, progress=not args.quiet, resume=not args.no_resume)
    return trained(summary)


def cmd_verifier(argv: list[str]) -> int:
    from distill.data import load_dataset
    from distill.pipeline import train_verifier
    from distill.trainer import TrainConfig
    from distill.verifier import VerifierConfig
    from flowmap.recipe import Recipe

    recipe = Recipe()
    parser = argparse.ArgumentParser("flowmap verifier", description="Train the classifier used by evaluation "
                                                                      "and Best-of-N.")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--out", required=True)
    add_config_flags(parser, VerifierConfig, title="verifier")
    _train_flags(parser, recipe.verifier_train)
    args = parser.parse_args(argv)
    summary = train_verifier(load_dataset(args.data), config_from(args, VerifierConfig),
                             config_from(args, TrainConfig, recipe.verifier_train), args.out,
                             progress=not args.quiet, resume=not args.no_resume)
    return trained(summary)


def cmd_distill(argv: list[str]) -> int:
    from distill.methods import METHODS, get_method
    from distill.pipeline import distill_student
    from distill.trainer import TrainConfig
    from flowmap.recipe import Recipe

    recipe = Recipe()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="freeflow")
    known, _ = pre.parse_known_args(argv)
    spec = get_method(known.method)  # a clear error for an unknown name, before any flag parsing
    parser = argparse.ArgumentParser("flowmap distill", description="Distil a teacher into a flow-map student. "
                                     + "Methods: " + "; ".join(f"{k}: {v.summary}" for k, v in METHODS.items()))
    parser.add_argument("--method", default="freeflow", choices=sorted(METHODS))
    parser.add_argument("--teacher", default=None, help=TEACHER_HELP + " (required except for fsf-dmd "
                        "--self-teacher)")
    parser.add_argument("--data", default=None, help="data for methods that use it (meanflow, fsf-dmd); "
                        "default: the file the teacher was trained on")
    parser.add_argument("--prompts", default=None, help="a text file, one prompt per line: what a diffusers "
                        "teacher generates from (data-free methods: freeflow, fgm, dmd2; meanflow and fsf-dmd "
                        "would need image-caption pairs, not supported for diffusers teachers yet)")
    parser.add_argument("--init", default=None, help="start from this student run's weights instead of the "
                        "teacher's (e.g. fsf-dmd from a meanflow or freeflow student)")
    parser.add_argument("--out", required=True)
    add_config_flags(parser, spec.config, title=f"{known.method} options")
    _train_flags(parser, recipe.distill_train)
    args = parser.parse_args(argv)
    from distill.data import load_dataset

    summary = distill_student(args.method, args.teacher, config_from(args, spec.config),
                              config_from(args, TrainConfig, recipe.distill_train), args.out,
                              progress=not args.quiet, resume=not args.no_resume,
                              data=load_dataset(args.data) if args.data else None, init=args.init,
                              prompts=read_prompts(args.prompts) if args.prompts else None)
    return trained(summary)


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompt file."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except IsADirectoryError:
        raise ValueError(f"--prompts {path} is a folder; give a text file, one prompt per line") from None
    if not prompts:
        raise SystemExit(f"--prompts {path}: no prompts in the file")
    return prompts


def cmd_evaluate(argv: list[str]) -> int:
    from distill.data import load_dataset
    from distill.evaluate import EvalConfig, to_markdown
    from distill.pipeline import run_evaluation

    parser = argparse.ArgumentParser("flowmap evaluate", description="FD, precision/recall, class accuracy and "
                                     "alignment of the teacher at several step counts and the student.")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", default=None, help="student run directory (omit to score the teacher only)")
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--out", default="docs/evaluation", help="writes OUT.md and OUT.json")
    add_config_flags(parser, EvalConfig, skip=("extra",), title="evaluation")
    args = parser.parse_args(argv)
    result = run_evaluation(args.teacher, args.student, args.verifier, load_dataset(args.data),
                            config_from(args, EvalConfig), args.out)
    print(to_markdown(result))
    return 0


def cmd_pipeline(argv: list[str]) -> int:
    parser = argparse.ArgumentParser("flowmap pipeline", description="A recipe end to end (what `make models` runs): "
                                     "digits (teacher, verifier, FreeFlow, evaluation, export) or shapes (CLIP, "
                                     "oracle, text-to-image teacher, FreeFlow, export).")
    parser.add_argument("--recipe", choices=("digits", "shapes"), default="digits")
    parser.add_argument("--runs", default=None, help="where checkpoints go (git-ignored; default runs/RECIPE)")
    parser.add_argument("--docs", default="docs", help="where the pipeline's reports go")
    parser.add_argument("--bundle", default=None, help="where the exported bundle goes (default models/RECIPE)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    runs, bundle = args.runs or f"runs/{args.recipe}", args.bundle or f"models/{args.recipe}"
    if args.recipe == "shapes":
        from flowmap.shapes_recipe import ShapesRecipe, run_shapes_pipeline

        report = run_shapes_pipeline(ShapesRecipe(), runs, args.docs, bundle, progress=not args.quiet)
        print(f"pipeline finished in {report['total_minutes']} min; see {args.docs}/shapes_pipeline.md")
        return 0
    from flowmap.recipe import Recipe, run_pipeline

    report = run_pipeline(Recipe(), runs, args.docs, bundle, progress=not args.quiet)
    print(f"pipeline finished in {report['total_minutes']} min; see {args.docs}/pipeline.md")
    return 0


def cmd_export(argv: list[str]) -> int:
    from export.onnx_export import PARITY_BATCHES
    from export.tensorrt import TensorRTConfig

    parser = argparse.ArgumentParser("flowmap export", description="Write a servable bundle: ONNX graphs with the "
                                     "guidance scale baked in (parity-checked), optionally TensorRT engines.")
    parser.add_argument("--student", help="student run directory (not needed with --skip-onnx)")
    parser.add_argument("--teacher", help=TEACHER_HELP)
    parser.add_argument("--verifier", help="verifier run directory; with a diffusers teacher, clip:FOLDER (a "
                        "transformers CLIPModel and its tokenizer) or nothing (the bundle then serves no search)")
    parser.add_argument("--out", required=True, help="bundle directory, e.g. models/digits")
    parser.add_argument("--name", default=None, help="bundle name (default: the folder name)")
    parser.add_argument("--guidance-scales", "--cfg-scales", dest="guidance_scales", type=float, nargs="+",
                        default=None, help="guidance scales to bake, one student graph each (default: 1.5)")
    parser.add_argument("--teacher-guidance-scale", "--teacher-cfg-scale", dest="teacher_guidance_scale", type=float,
                        default=None, help="the guidance scale baked into the teacher graph; default: the first "
                        "--guidance-scales")
    parser.add_argument("--metrics", default=None, help="an evaluation JSON to record in the provenance")
    parser.add_argument("--decoder", default=None, metavar="DIR",
                        help="a diffusers autoencoder folder (AutoencoderKL, AutoencoderTiny or AutoencoderDC, as "
                        "save_pretrained writes it, e.g. a pipeline's vae/): the student and teacher then work on "
                        "its latents and the bundle decodes them (format 2); default for a diffusers teacher: its vae/")
    parser.add_argument("--torch-programs", action="store_true",
                        help="also save each graph as a torch.export program (.pt2, parity-checked) for `flowmap serve "
                        "--backend torch` (a GPU without TensorRT or onnxruntime-gpu); it doubles the bundle's size")
    parser.add_argument("--parity-batches", type=int, nargs="+", default=None, metavar="N",
                        help="batch sizes each denoiser and a class verifier are checked at against torch, the largest "
                        f"also for batch invariance (default: {' '.join(map(str, PARITY_BATCHES))}; e.g. 1 3 for a "
                        "model whose batch of 64 a CPU cannot afford)")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs a GPU)")
    parser.add_argument("--triton", default=None, metavar="DIR", help="also write a Triton model repository to DIR")
    parser.add_argument("--triton-kind", default="KIND_CPU", choices=["KIND_CPU", "KIND_GPU"])
    parser.add_argument("--triton-instances", type=int, default=1)
    parser.add_argument("--triton-max-batch", type=int, default=256)
    parser.add_argument("--triton-plans", default=None, metavar="PRECISION",
                        help="use the bundle's TensorRT plans of this precision in the repository")
    parser.add_argument("--skip-onnx", action="store_true",
                        help="reuse the bundle's ONNX graphs (add TensorRT engines or a Triton repository)")
    add_config_flags(parser, TensorRTConfig, title="TensorRT (with --tensorrt)")
    args = parser.parse_args(argv)
    if args.skip_onnx:  # what only an export reads would be silently dropped
        ignored = [flag for flag, value in (("--student", args.student), ("--teacher", args.teacher),
                                            ("--verifier", args.verifier), ("--decoder", args.decoder),
                                            ("--torch-programs", args.torch_programs),
                                            ("--parity-batches", args.parity_batches), ("--metrics", args.metrics),
                                            ("--name", args.name), ("--guidance-scales", args.guidance_scales),
                                            ("--teacher-guidance-scale", args.teacher_guidance_scale))
                   if value is not None and value is not False]
        if ignored:
            parser.error(f"{', '.join(ignored)}: --skip-onnx adds to the bundle in --out as it is; export again "
                         "without --skip-onnx to change its graphs")
        if not (Path(args.out) / "manifest.json").is_file():
            parser.error(f"--skip-onnx adds to an exported bundle, and {args.out} holds none (no manifest.json)")
    if args.tensorrt:
        from export.trt_runtime import import_tensorrt

        try:
            import_tensorrt()
        except ImportError as err:
            print(f"flowmap export: {err}", file=sys.stderr)
            return 2
    triton = None
    if args.triton:  # checked before the export, not after it
        from export.triton import TritonConfig, preferred_batches, write_triton_repository

        triton = TritonConfig(max_batch_size=args.triton_max_batch, instances=args.triton_instances,
                              kind=args.triton_kind, tensorrt_precision=args.triton_plans,
                              preferred_batch_sizes=preferred_batches(args.triton_max_batch))
    if not args.skip_onnx:
        from export.writer import export_bundle

        text = bool(args.teacher) and args.teacher.startswith("diffusers:")
        if not (args.student and args.teacher and (args.verifier or text)):
            parser.error("--student, --teacher and --verifier are required unless --skip-onnx reuses a bundle "
                         "(--verifier is optional with a diffusers teacher)")

        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        export_bundle(args.student, args.teacher, args.verifier, args.out, tuple(args.guidance_scales or (1.5,)),
                      args.teacher_guidance_scale, args.name, metrics, decoder=args.decoder,
                      programs=args.torch_programs, parity_batches=tuple(args.parity_batches or PARITY_BATCHES))
    if args.tensorrt:
        from export.tensorrt import add_tensorrt_engines

        add_tensorrt_engines(args.out, config_from(args, TensorRTConfig))
    if triton is not None:
        for path in write_triton_repository(args.out, args.triton, triton):
            print(f"  wrote {path}")
    print(f"bundle {'updated' if args.skip_onnx else 'written'}: {args.out}")
    return 0


def settings_flags(parser: argparse.ArgumentParser, settings_cls) -> None:
    """One flag per Settings field; unset flags leave FLOWMAP_* variables and defaults in charge."""
    group = parser.add_argument_group("settings (also FLOWMAP_<NAME> environment variables)")
    for name, field in settings_cls.model_fields.items():
        flag, annotation = "--" + name.replace("_", "-"), field.annotation
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description + '; ' if field.description else ''}default: {default}"
        if annotation is bool:
            group.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif annotation in (int, float, str):
            group.add_argument(flag, dest=name, default=None, type=annotation, help=help_text)
        else:  # lists are comma-separated
            group.add_argument(flag, dest=name, default=None, type=str, help=help_text)


def cmd_serve(argv: list[str]) -> int:
    from pydantic import ValidationError

    from export.bundle import BundleError
    from server.main import serve
    from server.settings import RayOptions, Settings, settings_error

    parser = argparse.ArgumentParser("flowmap serve", description="Serve a bundle over HTTP: OpenAI-style images, "
                                     "batch generation, Best-of-N search, /metrics, OpenAPI docs at /docs.")
    settings_flags(parser, Settings)
    ray_group = parser.add_argument_group("Ray Serve (with --ray)")
    ray_group.add_argument("--ray", action="store_true", help="deploy the same app on Ray Serve, one engine set "
                           "per replica, behind Ray's HTTP proxy at --host:--port")
    ray_fields = {field.name: field.default for field in dataclasses.fields(RayOptions)}
    for name, default in ray_fields.items():
        ray_group.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default), default=default,
                               help=f"default: {default}")
    args = parser.parse_args(argv)
    ray_options = {name: getattr(args, name) for name in ray_fields}
    if not args.ray and ray_options != ray_fields:  # an operator who sets --replicas expects replicas
        given = ", ".join("--" + name.replace("_", "-") for name in ray_fields if ray_options[name] != ray_fields[name])
        print(f"flowmap serve: {given} only apply with --ray", file=sys.stderr)
        return 2
    try:
        ray_config = RayOptions(**ray_options)
    except ValueError as err:
        print(f"flowmap serve: invalid settings: {err}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ray_fields and k != "ray"}
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        print(f"flowmap serve: invalid settings: {settings_error(err)}", file=sys.stderr)
        return 2
    # before the bundle loads and the server starts, not inside its start-up (Ray's replicas may sit on GPU nodes)
    if settings.backend == "onnxruntime" and not args.ray:
        from server.engines import check_providers

        check_providers(settings.providers)
    try:
        if args.ray:
            try:
                from server.ray_app import run
            except ImportError as err:
                print(f"flowmap serve --ray needs Ray Serve ({err}): pip install 'flowmap-serve[ray]' "
                      "(or pip install 'ray[serve]')", file=sys.stderr)
                return 2
            run(settings, ray_config)
        else:
            return serve(settings)
    except BundleError as err:
        print(f"flowmap serve: refusing to start: {err}", file=sys.stderr)
        return 3
    return 0


# name: (what it measures, module, config class, run function, what to print of the report)
BENCHES = {
    "serve": ("HTTP throughput/latency, batching on/off, raw engine, student vs teacher",
              "flowmap.bench_serve", "ServeBenchConfig", "run_serve_bench", lambda report: report["ratios"]),
    "overload": ("goodput, refusals and latency when 4x more clients come than the server keeps up with",
                 "flowmap.bench_overload", "OverloadBenchConfig", "run_overload_bench", lambda r: r["checks"]),
    "distill": ("every distillation method from one teacher, same wall time, same evaluation",
                "flowmap.bench_distill", "DistillBenchConfig", "run_distill_bench",
                lambda report: [{k: m[k] for k in ("method", "fd_1nfe", "fd_2nfe", "sec_per_step")}
                                for m in report["methods"]]),
    "stages": ("what each request stage costs at real sizes: denoisers, VAE decoders, text encoders and the prompt "
               "cache, image encoders",
               "flowmap.bench_stages", "StagesBenchConfig", "run_stages_bench", lambda r: r["encoders"]),
    "search": ("what Best-of-N noise search buys at equal NFE: teacher, teacher best-of-M, student search with and "
               "without a teacher finish, judged by an oracle", "flowmap.bench_search", "SearchBenchConfig",
               "run_search_bench", lambda report: report["goals"]),
    "gpu": ("the torch backend on a CUDA GPU at real sizes: eager, compiled, CUDA graphs, fp32/bf16, MFU, nvJPEG, "
            "served", "flowmap.bench_gpu", "GpuBenchConfig", "run_gpu_bench", lambda report: report["goals"]),
    "recipe": ("seconds per training step and the projected run time of a few network sizes on your data",
               "flowmap.bench_recipe", "RecipeBenchConfig", "run_recipe_bench", lambda report: report["presets"]),
}


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        listing = "\n".join(f"  {name:10s} {entry[0]}" for name, entry in BENCHES.items())
        print(f"usage: flowmap bench <name> [options]\n\nbenchmarks:\n{listing}", file=sys.stderr)
        return 2
    import importlib

    text, module_name, config_name, run_name, summary = BENCHES[argv[0]]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    parser = argparse.ArgumentParser(f"flowmap bench {argv[0]}", description=f"{text}; writes OUT.md/.json/.png")
    add_config_flags(parser, config_cls, title="benchmark")
    report = getattr(module, run_name)(config_from(parser.parse_args(argv[1:]), config_cls))
    print(json.dumps(summary(report), indent=2))
    return 0


def cmd_readme(argv: list[str]) -> int:
    from flowmap.readme import update_readme

    argparse.ArgumentParser("flowmap readme", description="Regenerate the README's result tables from "
                            "models/digits/manifest.json and docs/*.json").parse_args(argv)
    print("README.md updated" if update_readme(Path.cwd()) else "README.md already up to date")
    return 0


def cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser("flowmap demo", description="The Gradio demo, standalone, against any "
                                     "flowmap server's HTTP API (`flowmap serve` also mounts it at /ui).")
    parser.add_argument("--url", action="append", default=None,
                        help="a server's base URL (default http://127.0.0.1:8000); repeat it for one page over several "
                        "servers, e.g. digits on :8000 and shapes on :8001, one tab each")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--api-key", default=None, help="bearer token, if the server requires one")
    args = parser.parse_args(argv)
    from ui.demo import launch

    urls = args.url or ["http://127.0.0.1:8000"]
    try:
        launch(urls, args.host, args.port, args.api_key)
    except httpx_errors() as err:
        print(f"flowmap demo: cannot reach {' or '.join(urls)}: {err}", file=sys.stderr)
        return 2
    return 0


def httpx_errors():
    import httpx

    return (httpx.HTTPError,)


COMMANDS = {
    "teacher": (cmd_teacher, "train a flow-matching teacher"),
    "verifier": (cmd_verifier, "train the verifier classifier"),
    "distill": (cmd_distill, "distil a teacher into a flow-map student"),
    "evaluate": (cmd_evaluate, "evaluate teacher and student"),
    "export": (cmd_export, "write a servable bundle (ONNX, TensorRT)"),
    "pipeline": (cmd_pipeline, "run a recipe end to end (digits, shapes)"),
    "serve": (cmd_serve, "serve a bundle over HTTP (API, /ui demo, /metrics)"),
    "demo": (cmd_demo, "the Gradio demo against a running server"),
    "bench": (cmd_bench, "measure and write reports under docs/"),
    "readme": (cmd_readme, "regenerate the README's result tables"),
}


def usage() -> str:
    lines = ["usage: flowmap <command> [options]", "", "commands:"]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`flowmap <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flowmap: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][0](rest) or 0
    except (ValueError, OSError) as err:  # user errors (a wrong value, a path that is not there): one line
        print(f"flowmap {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: the trainer says where it saved the run
        print(f"flowmap {name}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
