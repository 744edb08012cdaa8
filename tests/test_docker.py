"""No Docker engine runs here: check the deployment files for consistency instead."""

import json
import re
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.torch-gpu"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = dockerfile.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_exist_and_it_runs_as_non_root(name):
    rows = instructions(DOCKER / name)
    copies = [rest.split()[:-1] for keyword, rest in rows if keyword == "COPY"]
    assert copies, "no COPY instructions"
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
    users = [rest for keyword, rest in rows if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"
    health = " ".join(rest for keyword, rest in rows if keyword == "HEALTHCHECK")
    assert "/health/ready" in health
    env = " ".join(rest for keyword, rest in rows if keyword == "ENV")
    assert "FLOWMAP_BUNDLE=" in env and "FLOWMAP_HOST=0.0.0.0" in env
    assert any(keyword == "CMD" and "serve" in rest for keyword, rest in rows)


def test_cpu_image_installs_no_torch():
    runs = " ".join(rest for keyword, rest in instructions(DOCKER / "Dockerfile.cpu") if keyword == "RUN")
    assert "pip install -c constraints.txt ." in runs and "[train" not in runs and "torch" not in runs.lower()


def flowmap_env(dockerfile: Path) -> dict[str, str]:
    """The FLOWMAP_* variables an image's ENV lines set."""
    pairs = " ".join(rest for keyword, rest in instructions(dockerfile) if keyword == "ENV").split()
    return dict(pair.split("=", 1) for pair in pairs if pair.startswith("FLOWMAP_"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_setting_an_image_sets_is_one_the_server_reads(name):
    """A misspelt FLOWMAP_ variable would be ignored without a word (pydantic-settings drops unknown ones)."""
    from server.settings import Settings

    env = flowmap_env(DOCKER / name)
    known = {f"FLOWMAP_{field.upper()}" for field in Settings.model_fields}
    assert env and set(env) <= known, sorted(set(env) - known)
    Settings(**{key.removeprefix("FLOWMAP_").lower(): value for key, value in env.items()})  # and each value parses


def test_the_torch_gpu_image_serves_the_torch_backend_on_cuda_with_nvjpeg():
    env = flowmap_env(DOCKER / "Dockerfile.torch-gpu")
    assert env["FLOWMAP_BACKEND"] == "torch" and env["FLOWMAP_DEVICE"] == "cuda"
    runs = " ".join(rest for keyword, rest in instructions(DOCKER / "Dockerfile.torch-gpu") if keyword == "RUN")
    assert '-c constraints.txt ".[torch-gpu]"' in runs
    extra = re.search(r"^torch-gpu = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    assert set(re.findall(r'^\s*"([a-z-]+)', extra, re.M)) == {"torch", "torchvision"}


def test_the_server_and_demo_import_no_torch():
    import subprocess
    import sys

    code = "import sys, server.main, server.app, ui.demo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compose_and_prometheus_agree():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    services = compose["services"]
    assert {"flowmap", "prometheus", "grafana"} <= set(services)
    port = services["flowmap"]["ports"][0].split(":")[-1]
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"flowmap:{port}"]
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"
    build = services["flowmap"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (DOCKER / source).exists(), f"{service} mounts {source}, which does not exist"


def exported_metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_dashboard_queries_name_exported_metrics():
    dashboard = json.loads((DOCKER / "grafana" / "flowmap-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 6
    exported = exported_metric_names()
    used = {name for expr in exprs for name in re.findall(r"\b(flowmap_[a-z_]+)", expr)}
    assert used, "the dashboard queries no flowmap metric"
    missing = used - exported
    assert not missing, f"dashboard queries metrics the server does not export: {sorted(missing)}"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch"):
        assert topic in titles
