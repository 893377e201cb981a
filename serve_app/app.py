"""Builder that turns ``EmbeddingDeployment`` into a Serve application.

Import path for deploy configs: ``serve_app.app:build_app`` (its ``args`` are
the application arguments, see ``settings.ServeAppSettings``). Per-deployment
options in the deploy config (``max_ongoing_requests``, ``autoscaling_config``,
``ray_actor_options``, ``user_config``...) override the defaults below.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .deployment import EmbeddingIngress

DEPLOYMENT_NAME = "EmbeddingDeployment"

# Defaults for `serve.run(build_app(...))` from Python; deploy configs override them (the
# same values as config/serve.yaml). max_ongoing_requests >= max batch (faces, 1-face requests)
# x max_concurrent_batches (1), and large enough that requests reach the replica's own
# admission (bounded in faces and time, answering 503 at once) instead of queueing in the proxy.
DEFAULT_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": 128,
    "max_queued_requests": 64,
    "backpressure_config": {"retry_after_s": 1},
    "ray_actor_options": {"num_cpus": 1},
    "health_check_period_s": 5,
    "health_check_timeout_s": 30,
    "graceful_shutdown_timeout_s": 20,
}


def deployment_class():
    """The Serve deployment (FastAPI ingress + gRPC methods) around the plain class."""
    return serve.deployment(name=DEPLOYMENT_NAME, **DEFAULT_OPTIONS)(EmbeddingIngress)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for deploy configs (Serve passes exactly the ``args`` dict)."""
    return bind_app(args)


def bind_app(args: dict[str, Any] | None = None, **options: Any) -> Application:
    """The bound application; ``options`` go to ``Deployment.options`` (tests, Python)."""
    deployment = deployment_class()
    if options:
        deployment = deployment.options(**options)
    return deployment.bind(dict(args or {}))
