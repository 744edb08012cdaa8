"""`make mutants` stays runnable: every mutant still finds the line it mutates (exactly once), changes it, and
names tests that pytest collects, so a refactor that moves a line or renames a test fails here, in CI, rather
than stopping a mutants run half-way."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mutants():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_applies_once_and_names_tests_that_pytest_collects():
    listed = mutants()
    assert len({mutant.name for mutant in listed}) == len(listed), "two mutants share a name"
    for mutant in listed:
        assert (ROOT / mutant.path).read_text().count(mutant.original) == 1, mutant.name
        assert mutant.mutated != mutant.original and mutant.tests, mutant.name
    wanted = sorted({test for mutant in listed for test in mutant.tests})
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *wanted], cwd=ROOT, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    found = {line.strip() for line in collected.stdout.splitlines()}
    # an id without parameters names every parametrised case of its test
    assert not [test for test in wanted if test not in found and not any(case.startswith(test + "[") for case in found)]
