"""The deployment files against their published schemas (no cluster or Docker engine runs here).

Kubernetes objects are checked with ``kubernetes-validate`` (the API's OpenAPI schemas, strict: an
unknown or misspelt field fails); ``docker-compose.yml`` with the Compose Specification's JSON schema
as vendored by ``check-jsonschema``. Custom resources (KEDA's ScaledObject, Kustomize's Kustomization)
have no schema in either package: ``test_manifests.py`` checks those against the service's code.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"
NO_PUBLISHED_SCHEMA = {"ScaledObject", "Kustomization"}


def _k8s_objects() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        out += [(f"{path.name}:{doc['kind']}", doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


OBJECTS = _k8s_objects()


def _compose_schema() -> dict:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text())


@pytest.mark.parametrize(
    ("where", "obj"),
    [o for o in OBJECTS if o[1]["kind"] not in NO_PUBLISHED_SCHEMA],
    ids=[o[0] for o in OBJECTS if o[1]["kind"] not in NO_PUBLISHED_SCHEMA],
)
def test_kubernetes_object_matches_the_api_schema(where: str, obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_only_custom_resources_go_unchecked() -> None:
    kinds = {obj["kind"] for _, obj in OBJECTS}
    assert kinds & NO_PUBLISHED_SCHEMA == NO_PUBLISHED_SCHEMA
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds


def test_the_kubernetes_check_catches_a_misspelt_field() -> None:
    where, deployment = next(o for o in OBJECTS if o[1]["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_compose_file_matches_the_compose_specification() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, _compose_schema())


def test_the_compose_check_catches_a_misspelt_key() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = next(iter(compose["services"].values()))
    service["healthchek"] = {"test": ["CMD", "true"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(compose, _compose_schema())
