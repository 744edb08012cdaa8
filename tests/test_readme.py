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
                           "recipe-results", "settings"}


def test_readme_names_the_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    for needle in ("make serve", "make test", "curl ", "/v1/images/generations", "Deploy on a GPU", "torchrun"):
        assert needle in readme, needle
