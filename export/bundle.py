"""Read and validate a bundle (`models/<name>/manifest.json` + graphs). Imports neither torch nor onnx:
the server depends on this module alone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "flowmap-bundle/1"
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle is missing a file, fails a hash check, or has a manifest we cannot read."""


@dataclass(frozen=True)
class Graph:
    """One graph file of the bundle."""

    path: Path
    sha256: str
    guidance_scale: float | None = None


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
    root: Path
    name: str
    channels: int
    height: int
    width: int
    value_range: tuple[float, float]
    classes: tuple[str, ...]
    students: tuple[Graph, ...]
    teacher: Graph
    verifier: Graph
    tensorrt: tuple[EnginePlan, ...] = ()
    provenance: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

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


def _require(mapping: dict, key: str, where: str, kind=None):
    if key not in mapping:
        raise BundleError(f"manifest: {where} has no '{key}'")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise BundleError(f"manifest: {where}.{key} must be {kind.__name__ if isinstance(kind, type) else kind}, "
                          f"got {type(value).__name__}")
    return value


def _graph(root: Path, entry: dict, where: str, verify: bool, scaled: bool) -> Graph:
    if not isinstance(entry, dict):
        raise BundleError(f"manifest: {where} must be an object")
    name = _require(entry, "file", where, str)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"manifest: {where}.file must be a plain name inside the bundle, got {name!r}")
    expected = _require(entry, "sha256", where, str)
    path = root / name
    if not path.is_file():
        raise BundleError(f"bundle {root}: {where} file {name} is missing")
    if verify:
        actual = sha256_of(path)
        if actual != expected:
            raise BundleError(f"bundle {root}: {name} fails its sha256 check (manifest {expected[:12]}..., "
                              f"file {actual[:12]}...); the file was changed after export")
    guidance_scale = float(_require(entry, "cfg_scale", where, (int, float))) if scaled else None
    return Graph(path, expected, guidance_scale)


def read_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load and validate `root/manifest.json`; with `verify`, check every file's sha256."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"no bundle at {root}: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{manifest_path}: unknown format {fmt!r}; this server reads {FORMAT!r}")
    image = _require(manifest, "image", "the manifest", dict)
    channels, height, width = (int(_require(image, k, "image", int)) for k in ("channels", "height", "width"))
    value_range = tuple(float(v) for v in image.get("range", [-1, 1]))
    classes = tuple(str(c) for c in _require(manifest, "classes", "the manifest", list))
    if not classes:
        raise BundleError("manifest: 'classes' is empty")
    student_entries = _require(manifest, "student", "the manifest", list)
    if not student_entries:
        raise BundleError("manifest: 'student' lists no graphs")
    students = tuple(_graph(root, e, f"student[{i}]", verify, scaled=True) for i, e in enumerate(student_entries))
    scales = [g.guidance_scale for g in students]
    if len(set(scales)) != len(scales):
        raise BundleError(f"manifest: student guidance scales repeat: {scales}")
    teacher = _graph(root, _require(manifest, "teacher", "the manifest", dict), "teacher", verify, scaled=True)
    verifier = _graph(root, _require(manifest, "verifier", "the manifest", dict), "verifier", verify, scaled=False)
    engines = []
    for i, entry in enumerate(manifest.get("tensorrt", [])):
        graph = _graph(root, entry, f"tensorrt[{i}]", verify, scaled=False)
        engines.append(EnginePlan(graph.path, graph.sha256, str(entry.get("source", "")),
                                  str(entry.get("precision", "fp32")), int(entry.get("min_batch", 1)),
                                  int(entry.get("opt_batch", 1)), int(entry.get("max_batch", 1)),
                                  str(entry.get("device_name", ""))))
    return Bundle(root=root, name=str(manifest.get("name", root.name)), channels=channels, height=height,
                  width=width, value_range=(value_range[0], value_range[1]), classes=classes, students=students,
                  teacher=teacher, verifier=verifier, tensorrt=tuple(engines),
                  provenance=dict(manifest.get("provenance", {})), manifest=manifest)
