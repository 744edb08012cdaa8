"""Which code a measurement was made with, on a machine whose copy of the repository has no git (a lent GPU): the
files a module imports, its imports' imports and so on within this repository, hashed."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _file_of(module: str) -> Path | None:
    """The repository's file of a dotted module name, or None (a package's name, another project's module)."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module a file names in an import, at its top or inside a function (`from a import b` names a.b too:
    b may be a module; `from . import b` is read from the file's package)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            package = path.relative_to(ROOT).parent.parts
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            named |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return named


def imported_files(roots: tuple[str, ...]) -> list[Path]:
    """The repository files of `roots` and of everything they import, transitively, sorted."""
    seen, waiting = set(), [path for path in map(_file_of, roots) if path]
    while waiting:
        path = waiting.pop()
        if path not in seen:
            seen.add(path)
            waiting += [found for found in map(_file_of, _imports(path)) if found]
    return sorted(seen)


def code_version(roots: tuple[str, ...], files: tuple[str, ...] = ()) -> str:
    """The first 12 hex digits of the sha256 of `imported_files(roots)` and of `files` (paths in the repository,
    their imports not followed), names and contents."""
    digest = hashlib.sha256()
    for path in sorted(set(imported_files(roots)) | {ROOT / name for name in files}):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
