"""Ray Serve with a latent bundle: the decoder runs in a deployment of its own.

Its own module so that its Ray cluster never overlaps test_ray.py's (`ray stop` stops every cluster).
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
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


class SlowBucketedDecoder:
    """Answers each row's tag with the batch size it ran in; notes how many calls overlapped."""

    name, max_batch, buckets = "decoder", 4, (1, 2, 4)

    def __init__(self):
        self.inside, self.most_inside, self.sizes = 0, 0, []

    def run(self, feeds):
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.01)  # long enough for another thread to come in, were it let in
        latent = feeds["latent"]
        self.sizes.append(len(latent))
        self.inside -= 1
        return latent * 10 + len(latent)


def test_the_decoder_deployment_runs_one_padded_batch_at_a_time():
    from server.ray_app import SerialDecoder

    engine = SlowBucketedDecoder()
    decoder = SerialDecoder(engine)
    batches = [np.arange(rows, dtype=np.float64) + 100 * i for i, rows in enumerate((3, 1, 6, 2, 3, 5))]
    with ThreadPoolExecutor(6) as pool:  # as Ray's thread pool calls a deployment's plain method
        answers = list(pool.map(decoder.run, batches))
    assert engine.most_inside == 1  # a CUDA-graph engine's buffers take one batch at a time
    assert sorted(engine.sizes) == sorted([4, 1, 4, 2, 2, 4, 4, 1])  # padded to buckets, split at 4 rows
    ran_in = {3: [4] * 3, 1: [1], 6: [4] * 4 + [2] * 2, 2: [2] * 2, 5: [4] * 4 + [1]}
    for batch, answer in zip(batches, answers, strict=True):  # each caller its own rows, the padding dropped
        assert np.array_equal(answer // 10, batch) and list(answer % 10) == ran_in[len(batch)], (batch, answer)
