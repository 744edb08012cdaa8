"""How every `flowmap bench` writes its report: OUT.json (the numbers), OUT.png (a plot) and OUT.md
(the table a reader sees, linking the plot)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(report: dict, out: str | Path, plot: Callable[[dict, Path], None],
                 render_markdown: Callable[[dict, str], str]) -> None:
    """Write OUT.json, OUT.png and OUT.md for `report`, creating OUT's folder."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(render_markdown(report, path.with_suffix(".png").name))


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write at the reports' resolution, and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
