"""The house is one-way: distill <- export <- server <- flowmap, ui talks HTTP only, and no module
imports itself back through others. Read from the source with `ast`; nothing is imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "export", "server", "ui", "flowmap")
# What each package may import from the others (its own modules always).
MAY_IMPORT = {
    "distill": set(),
    "export": {"distill"},
    "server": {"export", "ui"},  # export.bundle (torch-free) and the demo it mounts
    "ui": set(),  # the demo reaches the server over HTTP only
    "flowmap": {"distill", "export", "server", "ui"},
}
# The torch engines (graphs rebuilt from run directories; .pt2 programs): the places in server/ that
# may reach distill/ and export's torch modules, and only inside their functions.
LAZY_EXCEPTIONS = {"server/engines.py": {"distill", "export"}, "server/torch_engine.py": {"export"}}
TORCH_FREE_EXPORT = {"export.bundle"}


def project_modules(root: Path) -> dict[str, Path]:
    return {".".join(path.relative_to(root).with_suffix("").parts): path
            for package in PACKAGES for path in (root / package).rglob("*.py") if path.name != "__init__.py"}


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits inside a function) for one file."""
    found = []

    def visit(node, lazy: bool):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module]
            found.extend((name, inner) for name in names if name.split(".")[0] in PACKAGES)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def upward_imports(root: Path) -> list[str]:
    wrong = []
    for module, path in project_modules(root).items():
        package, relative = module.split(".")[0], str(path.relative_to(root))
        for imported, lazy in imports_of(path):
            target = imported.split(".")[0]
            if target == package or target in MAY_IMPORT[package]:
                if package == "server" and target == "export" and imported not in TORCH_FREE_EXPORT \
                        and not (lazy and relative in LAZY_EXCEPTIONS):
                    wrong.append(f"{relative} imports {imported} (server may use export.bundle only)")
                continue
            if lazy and target in LAZY_EXCEPTIONS.get(relative, set()):
                continue
            wrong.append(f"{relative} imports {imported}{' (inside a function)' if lazy else ''}")
    return wrong


def circles(root: Path) -> list[str]:
    modules = project_modules(root)
    graph = {module: {name for name, _ in imports_of(path) if name in modules and name != module}
             for module, path in modules.items()}
    state: dict[str, str] = {}
    found = []

    def walk(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "open":
                found.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    return found


def test_imports_flow_one_way():
    wrong = upward_imports(ROOT)
    assert not wrong, "imports that run against the one-way house:\n" + "\n".join(wrong)


def test_no_module_imports_itself_back():
    found = circles(ROOT)
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "export" / "writer.py").write_text("from distill.pipeline import x\n")
    (tmp_path / "distill" / "pipeline.py").write_text("def run():\n    from export.writer import y\n")
    (tmp_path / "server" / "routes.py").write_text("from export.onnx_export import StudentGraph\n")
    (tmp_path / "ui" / "demo.py").write_text("from server.app import create_app\n")
    assert sorted(upward_imports(tmp_path)) == [
        "distill/pipeline.py imports export.writer (inside a function)",
        "server/routes.py imports export.onnx_export (server may use export.bundle only)",
        "ui/demo.py imports server.app"]
    assert circles(tmp_path) == ["distill.pipeline -> export.writer -> distill.pipeline"]
