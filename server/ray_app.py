"""Ray Serve: the same FastAPI app as `flowmap serve`, one copy per replica.

`serve.ingress` takes a builder that runs inside each replica, so every replica reads the bundle,
builds its own engines and batchers (in the app's lifespan, which Ray runs), and keeps its own
metrics. Settings reach the replicas as the usual FLOWMAP_* variables, so one settings object
configures both ways of serving. Deploy with `flowmap serve --ray`, or `serve run deploy/ray_serve.yaml`.

A bundle with a decoder deploys it apart (`flowmap-decoder`), with its own replicas and CPUs: on a
CPU the decoder costs far more than the denoiser, so the two scale apart. Each app replica still
batches decoder rows in its own batcher, and sends each batch to the decoder deployment.
"""

from __future__ import annotations

import threading

import numpy as np
from ray import serve
from ray.serve.config import AutoscalingConfig

from server.engines import pad_rows, padded_size
from server.imaging import join_rows
from server.settings import RayOptions, Settings

DECODER = "flowmap-decoder"


class RemoteDecoder:
    """An engine whose runs happen in the decoder deployment (called from the batcher's thread)."""

    name, buckets = "decoder", ()

    def __init__(self, handle, max_batch: int):
        self.handle, self.max_batch = handle, max_batch

    def run(self, feeds):
        return self.handle.remote(feeds["latent"]).result()


def build_replica_app():
    """Runs in the replica: the FastAPI app from FLOWMAP_* settings (the demo stays with `flowmap serve`)."""
    from export.bundle import read_bundle
    from server.app import create_app

    settings = Settings()

    def remote_engines():
        if read_bundle(settings.bundle, verify=False).decoder is None:
            return {}
        handle = serve.get_deployment_handle(DECODER, app_name="flowmap")
        return {"decoder": RemoteDecoder(handle, settings.decoder_max_batch_size)}

    return create_app(settings, mount_ui=False, remote_engines=remote_engines)


@serve.deployment(name="flowmap", max_ongoing_requests=256, graceful_shutdown_timeout_s=30)
@serve.ingress(build_replica_app)
class FlowmapReplica:
    """One replica: engines, batchers and routes of its own (the decoder's, if any, is a handle)."""

    def __init__(self, decoder=None):
        self.decoder = decoder  # bound so that Ray deploys the decoder with the app; reached by name


class SerialDecoder:
    """A decoder engine called as the server's batcher calls an engine, whoever calls this: one batch at a time
    (Ray runs a deployment's plain methods in a thread pool, and a CUDA-graph engine's static buffers take one
    batch at a time: two at once would hand one request the other's images), split at the engine's largest batch
    and padded to its buckets (its compiled and captured shapes), the padding dropped from the answer."""

    def __init__(self, engine):
        self.engine, self._one_at_a_time = engine, threading.Lock()

    def run(self, latent: np.ndarray):
        step = self.engine.max_batch
        with self._one_at_a_time:
            parts = [self._padded(latent[start:start + step]) for start in range(0, len(latent), step)]
        return parts[0] if len(parts) == 1 else join_rows(parts)

    def _padded(self, latent: np.ndarray):
        rows = len(latent)
        return self.engine.run({"latent": pad_rows(latent, padded_size(rows, self.engine.buckets))})[:rows]


@serve.deployment(name=DECODER, max_ongoing_requests=64)
class DecoderDeployment:
    """The bundle's decoder on its own replicas: latent batch in, image batch out."""

    def __init__(self):
        from export.bundle import read_bundle
        from server.engines import decoder_engine

        settings = Settings()
        self.decoder = SerialDecoder(decoder_engine(read_bundle(settings.bundle), settings))

    def __call__(self, latent):
        return self.decoder.run(latent)


def settings_env(settings: Settings) -> dict[str, str]:
    """Settings as the FLOWMAP_* variables each replica's Settings() reads back."""
    env = {}
    for name, value in settings.model_dump().items():
        text = ",".join(value) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else value
        env[f"FLOWMAP_{name.upper()}"] = str(text)
    return env


def application(settings: Settings, options: RayOptions):
    """The Ray Serve application: replicas (or an autoscaling range), resources and settings."""
    actor = {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica,
             "runtime_env": {"env_vars": settings_env(settings)}}
    if options.autoscale_max > options.replicas:
        scaling = AutoscalingConfig(min_replicas=options.replicas, max_replicas=options.autoscale_max,
                                    target_ongoing_requests=options.target_ongoing_requests)
        deployment = FlowmapReplica.options(autoscaling_config=scaling, ray_actor_options=actor)
    else:
        deployment = FlowmapReplica.options(num_replicas=options.replicas, ray_actor_options=actor)
    from export.bundle import read_bundle

    if read_bundle(settings.bundle, verify=False).decoder is None:
        return deployment.bind()
    decoder = DecoderDeployment.options(num_replicas=options.decoder_replicas, ray_actor_options={
        "num_cpus": options.cpus_per_decoder, "num_gpus": options.gpus_per_replica,
        "runtime_env": {"env_vars": settings_env(settings)}})
    return deployment.bind(decoder.bind())


def run(settings: Settings, options: RayOptions) -> None:
    """Start (or join) Ray, serve the app through Ray's HTTP proxy at settings.host:port, and block."""
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, options), name="flowmap", route_prefix="/", blocking=True)


# `serve run server.ray_app:app` (or deploy/ray_serve.yaml) deploys this with FLOWMAP_* from the environment.
app = application(Settings(), RayOptions())
