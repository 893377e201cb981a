"""Small helpers shared by test modules (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVE_MODEL_ARGS = {"model": "synthetic:mobilefacenet", "backend": "onnx"}


def deploy(name: str, args: dict | None = None, **options) -> None:
    """Deploy (or update) Serve application ``name`` at route ``/name``, 0-CPU replicas,
    serving ``synthetic:mobilefacenet`` on the onnx backend unless ``args`` say otherwise."""
    from ray import serve

    from serve_app.app import bind_app

    options.setdefault("ray_actor_options", {"num_cpus": 0})
    serve.run(bind_app({**SERVE_MODEL_ARGS, **(args or {})}, **options), name=name, route_prefix=f"/{name}")


def deploy_from_config(name: str, user_config: dict, args: dict | None = None) -> None:
    """Deploy application ``name`` the way ``serve deploy`` / KubeRay do: a declarative
    Serve config (import path + args + deployment options), applied by the controller.
    Only this path keeps the code version stable, so a ``user_config`` change reconfigures
    replicas in place instead of replacing them."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": [{
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serve_app.app:build_app",
        "args": {**SERVE_MODEL_ARGS, **(args or {})},
        "deployments": [{
            "name": "EmbeddingDeployment",
            "ray_actor_options": {"num_cpus": 0},
            "user_config": user_config,
        }],
    }]})
    _get_global_client().deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        deployment = app.deployments.get("EmbeddingDeployment") if app else None
        if app and app.status == "RUNNING" and deployment and deployment.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {name} not RUNNING: {serve.status().applications.get(name)}")
