"""The bundle (`models/<name>/manifest.json` + graphs), the contract between export and server.

`Manifest` is the one model of manifest.json: export writes it (`save`), the TensorRT builder adds its
engines to it, and the server reads it (`read_bundle`, which also resolves and hash-checks every file).
Imports neither torch nor onnx: the server depends on this module alone.

Format 1: the denoisers work on the images themselves. Format 2 adds an optional `decoder` graph:
the denoisers work on latents (`latent`: their shape) that the decoder turns into images (`image`),
and optional text `conditioning`: tokenizer files (HF `tokenizers` JSON, padding and truncation set)
and a text-encoder graph whose output [rows, width] per prompt is the denoisers' `label` input; such a
bundle has no classes, and its verifier is optional (without one it serves no search): a text-image
scorer (export/scorer.py) with a tokenizer of its own (`conditioning.verifier_tokenizer`). A bundle with
neither is written as format 1, which both formats' readers load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "flowmap-bundle/1"
FORMAT_2 = "flowmap-bundle/2"
MANIFEST = "manifest.json"
VALUE_RANGE = [-1, 1]  # every image a bundle produces lies in [-1, 1] (the convention)


class BundleError(ValueError):
    """A bundle is missing a file, fails a hash check, or has a manifest we cannot read."""


def _require(mapping: dict, key: str, where: str, kind=None):
    if key not in mapping:
        raise BundleError(f"manifest: {where} has no '{key}'")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise BundleError(f"manifest: {where}.{key} must be {kind.__name__ if isinstance(kind, type) else kind}, "
                          f"got {type(value).__name__}")
    return value


@dataclass
class GraphEntry:
    """One graph file as the manifest lists it."""

    file: str
    sha256: str
    guidance_scale: float | None = None  # the baked guidance; the format's key is "cfg_scale"
    data: GraphEntry | None = None  # the weights of a graph whose weights pass 1 GiB, in a file of their own
    program: GraphEntry | None = None  # the same graph as a torch.export program (.pt2), for the torch backend

    @classmethod
    def parse(cls, entry, where: str, scaled: bool) -> GraphEntry:
        if not isinstance(entry, dict):
            raise BundleError(f"manifest: {where} must be an object")
        name = _require(entry, "file", where, str)
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"manifest: {where}.file must be a plain name inside the bundle, got {name!r}")
        scale = float(_require(entry, "cfg_scale", where, (int, float))) if scaled else None
        data = cls.parse(entry["data"], f"{where}.data", scaled=False) if "data" in entry else None
        program = cls.parse(entry["program"], f"{where}.program", scaled=False) if "program" in entry else None
        return cls(name, _require(entry, "sha256", where, str), scale, data, program)

    def to_json(self) -> dict:
        entry = {"file": self.file, "sha256": self.sha256}
        if self.guidance_scale is not None:
            entry["cfg_scale"] = self.guidance_scale
        if self.data is not None:
            entry["data"] = self.data.to_json()
        if self.program is not None:
            entry["program"] = self.program.to_json()
        return entry


def takes_negative(text: bool, teacher_guidance_scale: float | None) -> bool:
    """Whether a bundle's teacher graph has a `negative` input: a text teacher with guidance (w != 1)
    takes the unconditional side's condition, so requests can give a negative prompt."""
    return text and teacher_guidance_scale is not None and teacher_guidance_scale != 1.0


@dataclass
class TextEntry:
    """Text conditioning as the manifest lists it: tokenizers, in the encoder graph's input order
    (`ids_0`, `ids_1`, ...), the encoder graph, and the shape of one prompt's condition."""

    tokenizers: list[GraphEntry]
    encoder: GraphEntry
    shape: tuple[int, int]  # (rows, width)
    verifier_tokenizer: GraphEntry | None = None  # the prompt in the verifier's own tokens (export/scorer.py)
    null: GraphEntry | None = None  # the empty prompt's condition (.npy), the teacher's default negative

    @classmethod
    def parse(cls, raw) -> TextEntry:
        if not isinstance(raw, dict) or raw.get("kind") != "text":
            raise BundleError("manifest: conditioning must be an object with kind 'text'")
        tokenizers = _require(raw, "tokenizers", "conditioning", list)
        if not tokenizers:
            raise BundleError("manifest: conditioning.tokenizers lists no files")
        shape = _require(raw, "shape", "conditioning", list)
        entries = [GraphEntry.parse(t, f"conditioning.tokenizers[{i}]", scaled=False) for i, t in enumerate(tokenizers)]
        encoder = GraphEntry.parse(_require(raw, "encoder", "conditioning", dict), "conditioning.encoder", scaled=False)
        scorer = (GraphEntry.parse(raw["verifier_tokenizer"], "conditioning.verifier_tokenizer", scaled=False)
                  if "verifier_tokenizer" in raw else None)
        null = GraphEntry.parse(raw["null"], "conditioning.null", scaled=False) if "null" in raw else None
        return cls(entries, encoder, (int(shape[0]), int(shape[1])), scorer, null)

    def to_json(self) -> dict:
        out = {"kind": "text", "tokenizers": [t.to_json() for t in self.tokenizers],
               "encoder": self.encoder.to_json(), "shape": list(self.shape)}
        if self.verifier_tokenizer is not None:
            out["verifier_tokenizer"] = self.verifier_tokenizer.to_json()
        if self.null is not None:
            out["null"] = self.null.to_json()
        return out


@dataclass
class Manifest:
    """manifest.json, field by field. `tensorrt` entries are device-specific and keep whatever their
    builder recorded; `provenance` is free-form (method, steps, source commit, configs, metrics)."""

    name: str
    image_shape: tuple[int, int, int]  # (channels, height, width) of the images served and scored
    classes: list[str]
    students: list[GraphEntry]
    teacher: GraphEntry
    verifier: GraphEntry | None  # None only for text bundles: they serve no search without one
    tensorrt: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    decoder: GraphEntry | None = None  # format 2: latent -> image
    latent_shape: tuple[int, int, int] | None = None  # format 2: what the denoisers work on
    text: TextEntry | None = None  # format 2: prompts -> the denoisers' condition

    @property
    def format(self) -> str:
        return FORMAT if self.decoder is None and self.text is None else FORMAT_2

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What noise, the student and the teacher work on: the latent, or the image itself."""
        return self.latent_shape or self.image_shape

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read and validate `root/manifest.json` (file hashes are read_bundle's job)."""
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise BundleError(f"no bundle at {root}: {MANIFEST} is missing")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise BundleError(f"{path} must hold a JSON object")
        if raw.get("format") not in (FORMAT, FORMAT_2):
            raise BundleError(f"{path}: unknown format {raw.get('format')!r}; this server reads {FORMAT!r} and "
                              f"{FORMAT_2!r}")
        image = _require(raw, "image", "the manifest", dict)
        shape = tuple(int(_require(image, key, "image", int)) for key in ("channels", "height", "width"))
        decoder = latent_shape = None
        if raw["format"] == FORMAT_2 and "decoder" in raw:
            decoder = GraphEntry.parse(raw["decoder"], "decoder", scaled=False)
            latent = _require(raw, "latent", "the manifest", dict)
            latent_shape = tuple(int(_require(latent, key, "latent", int)) for key in ("channels", "height", "width"))
        if list(image.get("range", VALUE_RANGE)) != VALUE_RANGE:
            raise BundleError(f"manifest: image.range must be {VALUE_RANGE} (bundles produce images in [-1, 1]), "
                              f"got {image.get('range')}")
        text = TextEntry.parse(raw["conditioning"]) if raw["format"] == FORMAT_2 and "conditioning" in raw else None
        classes = [str(c) for c in _require(raw, "classes", "the manifest", list)]
        if not classes and text is None:
            raise BundleError("manifest: 'classes' is empty")
        if text is None and "verifier" not in raw:
            raise BundleError("manifest: the manifest has no 'verifier' (only text bundles may go without)")
        verifier = GraphEntry.parse(raw["verifier"], "verifier", scaled=False) if "verifier" in raw else None
        student_entries = _require(raw, "student", "the manifest", list)
        if not student_entries:
            raise BundleError("manifest: 'student' lists no graphs")
        students = [GraphEntry.parse(e, f"student[{i}]", scaled=True) for i, e in enumerate(student_entries)]
        scales = [s.guidance_scale for s in students]
        if len(set(scales)) != len(scales):
            raise BundleError(f"manifest: student guidance scales repeat: {scales}")
        return cls(name=str(raw.get("name", Path(root).name)), image_shape=shape, classes=classes, students=students,
                   teacher=GraphEntry.parse(_require(raw, "teacher", "the manifest", dict), "teacher", scaled=True),
                   verifier=verifier, tensorrt=list(raw.get("tensorrt", [])),
                   provenance=dict(raw.get("provenance", {})), decoder=decoder, latent_shape=latent_shape, text=text)

    def to_json(self) -> dict:
        channels, height, width = self.image_shape
        out = {
            "format": self.format,
            "name": self.name,
            "image": {"channels": channels, "height": height, "width": width, "range": VALUE_RANGE},
        }
        if self.decoder is not None:
            out["latent"] = dict(zip(("channels", "height", "width"), self.latent_shape, strict=True))
        out.update({
            "classes": self.classes,
            "student": [s.to_json() for s in self.students],
            "teacher": self.teacher.to_json(),
        })
        if self.verifier is not None:
            out["verifier"] = self.verifier.to_json()
        if self.decoder is not None:
            out["decoder"] = self.decoder.to_json()
        if self.text is not None:
            out["conditioning"] = self.text.to_json()
        out.update({"tensorrt": self.tensorrt, "provenance": self.provenance})
        return out

    def save(self, root: str | Path) -> Path:
        path = Path(root) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


@dataclass(frozen=True)
class Graph:
    """One graph file of a read bundle: its path, checked hash and baked guidance scale."""

    path: Path
    sha256: str
    guidance_scale: float | None = None
    data: Path | None = None  # its external weights (over 1 GiB of them), beside it under the name the graph holds
    program: Path | None = None  # its torch.export program (.pt2), when the bundle was exported with them


@dataclass(frozen=True)
class TextConditioning:
    """The resolved text conditioning: tokenizer files, the encoder graph, one prompt's condition shape."""

    tokenizers: tuple[Graph, ...]
    encoder: Graph
    shape: tuple[int, int]
    verifier_tokenizer: Graph | None = None
    null: Graph | None = None  # null_condition.npy: the empty prompt's condition [rows, width]


@dataclass(frozen=True)
class EnginePlan:
    """A TensorRT engine built from one of the ONNX graphs (device-specific)."""

    path: Path
    sha256: str
    source: str  # the ONNX file it was built from
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    device_name: str = ""


@dataclass(frozen=True)
class Bundle:
    """A bundle as the server uses it: the manifest with every file resolved under `root`."""

    root: Path
    manifest: Manifest
    students: tuple[Graph, ...]
    teacher: Graph
    verifier: Graph | None
    tensorrt: tuple[EnginePlan, ...] = ()
    decoder: Graph | None = None
    text: TextConditioning | None = None

    @property
    def teacher_takes_negative(self) -> bool:
        return takes_negative(self.text is not None, self.teacher.guidance_scale)

    @property
    def conditioning(self) -> str:
        """"text" (prompts through the text encoder) or "class" (labels from the class table)."""
        return "text" if self.text is not None else "class"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest.classes)

    @property
    def provenance(self) -> dict:
        return self.manifest.provenance

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The images served and scored."""
        return self.manifest.image_shape

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What noise, the student and the teacher work on (latents when the bundle has a decoder)."""
        return self.manifest.sample_shape

    @property
    def guidance_scales(self) -> tuple[float, ...]:
        return tuple(g.guidance_scale for g in self.students)

    def student_for(self, guidance_scale: float | None) -> Graph:
        """The student graph with this baked guidance scale (the first one when None)."""
        if guidance_scale is None:
            return self.students[0]
        for graph in self.students:
            if abs(graph.guidance_scale - guidance_scale) < 1e-6:
                return graph
        raise KeyError(guidance_scale)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _resolve(root: Path, entry: GraphEntry, where: str, verify: bool) -> Graph:
    path = root / entry.file
    if not path.is_file():
        raise BundleError(f"bundle {root}: {where} file {entry.file} is missing")
    if verify:
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise BundleError(f"bundle {root}: {entry.file} fails its sha256 check (manifest {entry.sha256[:12]}..., "
                              f"file {actual[:12]}...); the file was changed after export")
    data = _resolve(root, entry.data, f"{where}.data", verify).path if entry.data is not None else None
    program = _resolve(root, entry.program, f"{where}.program", verify).path if entry.program is not None else None
    return Graph(path, entry.sha256, entry.guidance_scale, data, program)


def read_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load and validate `root/manifest.json`; with `verify`, check every file's sha256."""
    root = Path(root)
    manifest = Manifest.load(root)
    engines = []
    for i, raw in enumerate(manifest.tensorrt):
        where = f"tensorrt[{i}]"
        graph = _resolve(root, GraphEntry.parse(raw, where, scaled=False), where, verify)
        engines.append(EnginePlan(graph.path, graph.sha256, str(raw.get("source", "")),
                                  str(raw.get("precision", "fp32")), int(raw.get("min_batch", 1)),
                                  int(raw.get("opt_batch", 1)), int(raw.get("max_batch", 1)),
                                  str(raw.get("device_name", ""))))
    return Bundle(root=root, manifest=manifest,
                  students=tuple(_resolve(root, s, f"student[{i}]", verify) for i, s in enumerate(manifest.students)),
                  teacher=_resolve(root, manifest.teacher, "teacher", verify),
                  verifier=_resolve(root, manifest.verifier, "verifier", verify) if manifest.verifier else None,
                  tensorrt=tuple(engines),
                  decoder=_resolve(root, manifest.decoder, "decoder", verify) if manifest.decoder else None,
                  text=_resolve_text(root, manifest.text, verify) if manifest.text else None)


def _resolve_text(root: Path, text: TextEntry, verify: bool) -> TextConditioning:
    tokenizers = tuple(_resolve(root, entry, f"conditioning.tokenizers[{i}]", verify)
                       for i, entry in enumerate(text.tokenizers))
    scorer = (_resolve(root, text.verifier_tokenizer, "conditioning.verifier_tokenizer", verify)
              if text.verifier_tokenizer else None)
    null = _resolve(root, text.null, "conditioning.null", verify) if text.null else None
    return TextConditioning(tokenizers, _resolve(root, text.encoder, "conditioning.encoder", verify), text.shape,
                            scorer, null)
