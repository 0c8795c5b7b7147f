"""The API's container is given more time to stop than `serve` takes to shut down gracefully.

After SIGTERM `serve` lets in-flight requests (long polls up to ``EXCLIP_WAIT_MAX_S``) finish for
``Settings.shutdown_grace_s``, then runs its lifespan shutdown (closing the queue); an orchestrator
that kills it sooner cuts answers off. Kubernetes' default grace is 30 s, Docker's 10 s.
"""

from __future__ import annotations

import re

from tests.deploy.test_manifests import (
    FOREIGN_ENV,
    _container,
    _container_env,
    _exclip_deployments,
    _exclip_services,
)

LIFESPAN_MARGIN_S = 10  # closing connections and the queue after the last request
K8S_DEFAULT_GRACE_S = 30
COMPOSE_DEFAULT_GRACE_S = 10


def _serve_settings(settings_cls, names: dict[str, str], env: dict[str, str]):
    return settings_cls(**{names[k.upper()]: v for k, v in env.items() if k not in FOREIGN_ENV})


def _seconds(duration: str) -> float:
    """A compose duration (``90s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def test_k8s_api_grace_period_covers_the_graceful_shutdown(k8s_docs, settings_cls, setting_env_names):
    api = _exclip_deployments(k8s_docs)["serve"]
    settings = _serve_settings(settings_cls, setting_env_names, _container_env(k8s_docs, _container(api)))
    grace = api["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_S)
    needed = settings.shutdown_grace_s + LIFESPAN_MARGIN_S
    assert grace >= needed, f"exclip-api: terminationGracePeriodSeconds {grace} < {needed} s shutdown"


def test_compose_api_stop_grace_period_covers_the_graceful_shutdown(compose, settings_cls, setting_env_names):
    (api,) = [s for s in _exclip_services(compose).values() if s["command"][0] == "serve"]
    settings = _serve_settings(settings_cls, setting_env_names, api["environment"])
    grace = _seconds(api.get("stop_grace_period", f"{COMPOSE_DEFAULT_GRACE_S}s"))
    needed = settings.shutdown_grace_s + LIFESPAN_MARGIN_S
    assert grace >= needed, f"compose api: stop_grace_period {grace} s < {needed} s shutdown"


def test_the_shutdown_grace_follows_the_longest_wait(settings_cls):
    assert settings_cls().shutdown_grace_s == 70  # the documented default: 60 s long polls + 10 s
    assert settings_cls(wait_max_s=119.5).shutdown_grace_s == 130
    assert settings_cls(wait_max_s=0).shutdown_grace_s == 10


def test_serve_passes_the_shutdown_grace_to_uvicorn(monkeypatch, settings_cls):
    """What the manifests are checked against is what `serve` gives uvicorn."""
    import uvicorn

    from service import cli

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(cli, "_load_models", lambda settings: None)
    cli.serve(settings_cls(wait_max_s=45, redis_url="redis://127.0.0.1:1/0"))
    assert seen["timeout_graceful_shutdown"] == 55
