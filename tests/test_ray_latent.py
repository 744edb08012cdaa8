"""Ray Serve with a latent bundle: the decoder runs in a deployment of its own.

Its own module so that its Ray cluster never overlaps test_ray.py's (`ray stop` stops every cluster).
"""

import subprocess
import sys

import httpx
import pytest

from serving import Server, ray_serve

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the dev extra)")
pytestmark = pytest.mark.ray


def test_a_latent_bundle_decodes_in_a_deployment_of_its_own(tiny_latent):
    bundle = tiny_latent[0]
    body = {"labels": ["a", "b", "c"], "seeds": [1, 2, 3], "steps": 2, "output_format": "jpeg"}
    plain = Server("--no-ui", bundle=bundle).wait_ready()
    try:
        direct = httpx.post(plain.url + "/v1/generate", json=body, timeout=60).json()
    finally:
        plain.stop()
    serving = ray_serve(bundle, "--replicas", "1", "--cpus-per-replica", "0.5", "--decoder-replicas", "1",
                        "--cpus-per-decoder", "0.5")
    url = next(serving)
    try:
        via_ray = httpx.post(url + "/v1/generate", json=body, timeout=60).json()
        deployments = subprocess.run(
            [sys.executable, "-c", "import ray; from ray import serve; ray.init(address='auto', logging_level='ERROR');"
             "print(sorted(serve.status().applications['flowmap'].deployments))"],
            capture_output=True, text=True, timeout=120).stdout
    finally:
        serving.close()
    assert via_ray["images"] == direct["images"]  # the remote decoder makes the same bytes
    assert "'flowmap-decoder'" in deployments and "'flowmap'" in deployments
