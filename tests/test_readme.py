"""The README's result tables are generated from the committed reports, never typed by hand."""

import re
from pathlib import Path

from flowmap.readme import BLOCKS, rendered

ROOT = Path(__file__).resolve().parents[1]


def test_generated_blocks_match_the_committed_reports():
    readme = (ROOT / "README.md").read_text()
    for name, expected in rendered(ROOT).items():
        match = re.search(rf"<!-- begin:{name} -->\n(.*?)\n<!-- end:{name} -->", readme, re.S)
        assert match, f"README.md has no generated block {name!r}"
        assert match.group(1) == expected, f"README block {name!r} is stale: run `flowmap readme`"
    assert set(BLOCKS) == {"distill-results", "methods-results", "serving-results", "overload-results",
                           "recipe-results", "stages-results", "search-results", "gpu-results", "settings"}


def test_readme_names_the_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    for needle in ("make serve", "make test", "curl ", "/v1/images/generations", "Deploy on a GPU", "torchrun",
                   "scripts/gpu_check.sh", "make serve-shapes", "flowmap bench search"):
        assert needle in readme, needle


def test_the_code_cites_sections_that_docs_methods_has():
    """Every `docs/methods.md §N` in the code names a section the document has."""
    sections = set(re.findall(r"^## §(\d+)", (ROOT / "docs" / "methods.md").read_text(), re.M))
    cited = {}
    for path in ROOT.glob("*/*.py"):
        for number in re.findall(r"docs/methods\.md §(\d+)", path.read_text()):
            cited.setdefault(number, path.relative_to(ROOT))
    assert cited, "no module cites docs/methods.md"
    missing = {n: str(p) for n, p in cited.items() if n not in sections}
    assert not missing, f"cited sections that docs/methods.md lacks: {missing}"


def test_the_architecture_doc_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for package in ("distill", "export", "server", "ui", "flowmap"):
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__init__.py":
                assert path.name in text, f"docs/architecture.md does not name {package}/{path.name}"
