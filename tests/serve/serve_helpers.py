"""Helpers shared by the Serve tests: start an app on loopback, build bodies, post JSON."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import requests

from qzoom_ray.serve.bench import chat_body
from qzoom_ray.serve.config import ServeArgs
from qzoom_ray.serve.local import LOCAL_RAY_ENV, local_cpu_args, start_local, stop_local

SERVE_YAML = Path(__file__).resolve().parents[2] / "configs" / "serve.yaml"

TOKEN = "test-token-123"
MODEL = "qzoom"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args_for(model_dir: str, **overrides) -> ServeArgs:
    """The local CPU args on the session's tiny model, with short generations."""
    args = local_cpu_args(**overrides)
    engine = args.engine.model_copy(
        update={
            "model": args.engine.model.model_copy(update={"path": model_dir}),
            "generation": args.engine.generation.model_copy(update={"max_new_tokens": 6}),
        }
    )
    return args.model_copy(update={"engine": engine})


@contextlib.contextmanager
def running_app(args: ServeArgs) -> Iterator[str]:
    # Replicas inherit the environment of the process that starts Ray, so the token goes in first.
    os.environ["QZOOM_API_KEYS"] = f"{TOKEN},second-token"
    try:
        yield start_local(args, port=free_port(), num_cpus=2)
    finally:
        stop_local()


def yaml_config(args: ServeArgs, port: int) -> dict:
    """configs/serve.yaml with ``args`` in place of its GPU-sized args, on 127.0.0.1:``port``."""
    import yaml

    config = yaml.safe_load(SERVE_YAML.read_text())
    config["applications"][0]["args"] = args.model_dump(mode="json")
    # The YAML's live thresholds are calibrated for embedded:tiny; the session's random model scores about
    # 0.52 at the gate and its RoI maps may have no cell above 0.6, so the tests use thresholds it crosses.
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] == "CoarseServer":
            dep["user_config"].update(gate_thresh=0.1, roi_thresh=0.08)
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    return config


def with_user_config(config: dict, deployment: str, **changes) -> dict:
    out = copy.deepcopy(config)
    for dep in out["applications"][0]["deployments"]:
        if dep["name"] == deployment:
            dep["user_config"] = {**dep.get("user_config", {}), **changes}
    return out


def deploy_config(config: dict) -> None:
    """What `serve deploy` makes the controller do (the CLI posts the YAML to the dashboard, which
    calls this); the dashboard itself is left out to save CPU."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


@contextlib.contextmanager
def running_yaml_app(config: dict) -> Iterator[str]:
    import ray
    from ray import serve

    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["QZOOM_API_KEYS"] = f"{TOKEN},second-token"
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        serve.start(http_options=config["http_options"])
        deploy_config(config)
        yield f"http://127.0.0.1:{config['http_options']['port']}"
    finally:
        stop_local()


def post(url: str, body: dict | bytes, token: str | None = TOKEN, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return requests.post(url + "/v1/chat/completions", data=body, headers=headers, timeout=60, **kw)
    return requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def body_with_url(image_url: str, question: str = "What is the total?", **kw) -> dict:
    body = chat_body(b"", question, **kw)
    body["messages"][0]["content"][0]["image_url"]["url"] = image_url
    return body


def assert_openai_error(resp: requests.Response, status: int, contains: str = "") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert contains.lower() in err["message"].lower(), err
    return err
