"""Ray Serve: the same FastAPI app as `flowmap serve`, one copy per replica.

`serve.ingress` takes a builder that runs inside each replica, so every replica reads the bundle,
builds its own engines and batchers (in the app's lifespan, which Ray runs), and keeps its own
metrics. Settings reach the replicas as the usual FLOWMAP_* variables, so one settings object
configures both ways of serving. Deploy with `flowmap serve --ray`, or `serve run deploy/ray_serve.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray import serve
from ray.serve.config import AutoscalingConfig

from server.settings import Settings


def build_replica_app():
    """Runs in the replica: the FastAPI app from FLOWMAP_* settings (the demo stays with `flowmap serve`)."""
    from server.app import create_app

    return create_app(Settings(), mount_ui=False)


@serve.deployment(name="flowmap", max_ongoing_requests=256, graceful_shutdown_timeout_s=30)
@serve.ingress(build_replica_app)
class FlowmapReplica:
    """One replica: engines, batchers and routes of its own."""


@dataclass
class RayOptions:
    replicas: int = 2
    autoscale_max: int = 0  # > replicas turns on autoscaling between `replicas` and this many
    target_ongoing_requests: int = 64  # the autoscaler's target per replica
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0


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
    return deployment.bind()


def run(settings: Settings, options: RayOptions) -> None:
    """Start (or join) Ray, serve the app through Ray's HTTP proxy at settings.host:port, and block."""
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, options), name="flowmap", route_prefix="/", blocking=True)


# `serve run server.ray_app:app` (or deploy/ray_serve.yaml) deploys this with FLOWMAP_* from the environment.
app = application(Settings(), RayOptions())
