"""`make mutants` stays runnable: every mutant still finds the line it mutates (exactly once) and names tests that
exist, so a refactor that moves a line fails here, in CI, rather than stopping a mutants run half-way."""

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mutants():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_applies_once_and_names_tests_that_exist():
    listed = mutants()
    assert len({mutant.name for mutant in listed}) == len(listed), "two mutants share a name"
    for mutant in listed:
        assert (ROOT / mutant.path).read_text().count(mutant.original) == 1, mutant.name
        for test in mutant.tests:
            path, name = test.split("::")
            function = name.split("[")[0]
            defined = {node.name for node in ast.walk(ast.parse((ROOT / path).read_text()))
                       if isinstance(node, ast.FunctionDef)}
            assert function in defined, f"{mutant.name}: {test}"
