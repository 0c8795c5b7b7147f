"""Fixtures that read the deployment files and the real service code they must agree with."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def settings_cls():
    from service.settings import Settings

    return Settings


def env_names_of(settings_cls) -> dict[str, str]:
    """Env var name -> field name, the way pydantic-settings resolves them (case-insensitive)."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for field_name, info in settings_cls.model_fields.items():
        alias = info.validation_alias or info.alias
        if isinstance(alias, AliasChoices):
            choices = [c for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            choices = [alias]
        else:
            choices = [prefix + field_name]
        names.update({c.upper(): field_name for c in choices})
    return names


@pytest.fixture(scope="session")
def setting_env_names(settings_cls) -> dict[str, str]:
    return env_names_of(settings_cls)


@pytest.fixture(scope="session")
def cli_parser() -> argparse.ArgumentParser:
    cli = importlib.import_module("service.cli")
    return cli.build_parser()


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


@pytest.fixture(scope="session")
def cli_subcommands(cli_parser) -> dict[str, argparse.ArgumentParser]:
    return subparsers_of(cli_parser)


class ServedPaths:
    """``path in served`` GETs the path on the real app (embedded mode, no worker): not 404 = served.

    Asking the app rather than listing its routes keeps this independent of FastAPI's router internals.
    """

    def __init__(self, client) -> None:
        self.client = client

    def __contains__(self, path: str) -> bool:
        return self.client.get(path).status_code != 404


@pytest.fixture(scope="session")
def api_paths() -> Iterator[ServedPaths]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(redis_url=None))) as client:
        served = ServedPaths(client)
        assert "/healthz" in served and "/no-such-path" not in served
        yield served


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def k8s_docs() -> list[dict]:
    """Every Kubernetes object of deploy/k8s, in the order kustomization.yaml lists the files."""
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if d]
    return docs
