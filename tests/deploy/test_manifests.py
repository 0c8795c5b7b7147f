"""docker-compose.yml and deploy/k8s checked against the real service code.

Every command is an `exclip-service` subcommand the CLI parser accepts, every env var is a setting the
service reads (and its value validates), ports and health paths match the FastAPI routes, the KEDA
trigger names the service's own stream and consumer group, and compose and Kubernetes use the same
images, cache mount and Redis persistence.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Not service settings but read inside the image: huggingface_hub's cache (open_clip downloads via it),
# and glibc's allocator tuning of the API (see tests/service/test_api_memory.py).
MALLOC_ENV = {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"}
FOREIGN_ENV = {"HF_HOME", *MALLOC_ENV}
CACHE_MOUNT = "/cache"
IMAGE_REPO = "exclip-service"


def _version() -> str:
    # tomllib is Python >= 3.11 only; the version line is simple enough for a regex.
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "deploy/Dockerfile").read_text(), re.M | re.I))


def _dockerfile_uid() -> int:
    return int(re.search(r"useradd[^\n]*--uid\s+(\d+)", (ROOT / "deploy/Dockerfile").read_text()).group(1))


# ----------------------------------------------------------------------------------------------------
# Helpers shared by compose and Kubernetes


def check_command(argv: list[str], parser, subcommands) -> str:
    """The argv after the ENTRYPOINT must parse; returns the subcommand."""
    assert argv and argv[0] in subcommands, f"{argv}: not one of the CLI subcommands {sorted(subcommands)}"
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports errors by exiting
        raise AssertionError(f"`exclip-service {' '.join(argv)}` is rejected by the CLI parser") from exc
    return argv[0]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def check_env(env: dict[str, str], settings_cls, names: dict[str, str], where: str) -> None:
    """Every name is read by Settings, and Settings accepts the value (same as when the service starts)."""
    for name, value in env.items():
        if name in FOREIGN_ENV:
            continue
        assert name.upper() in names, f"{where}: {name} is not a setting of service/settings.py"
        field = names[name.upper()]
        parsed = settings_cls(**{field: value})  # raises on a value the service would reject at startup
        assert getattr(parsed, field) is not None or value.strip().lower() in ("", "none")


def check_cache(env: dict[str, str], mounts: list[str], where: str) -> None:
    assert CACHE_MOUNT in mounts, f"{where}: model cache not mounted at {CACHE_MOUNT}"
    for var in ("EXCLIP_CACHE_DIR", "HF_HOME"):
        assert env[var].startswith(CACHE_MOUNT + "/"), f"{where}: {var}={env[var]} is not on the cache volume"


# ----------------------------------------------------------------------------------------------------
# docker-compose.yml


def _exclip_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s["image"].startswith(IMAGE_REPO + ":")}


def test_compose_has_redis_api_gpu_worker_and_cpu_worker(compose):
    services = _exclip_services(compose)
    roles = {name: s["command"][0] for name, s in services.items()}
    assert sorted(roles.values()) == ["serve", "worker", "worker"], roles
    gpu = [
        n
        for n, s in services.items()
        if "devices" in s.get("deploy", {}).get("resources", {}).get("reservations", {})
    ]
    assert len(gpu) == 1 and roles[gpu[0]] == "worker"
    cpu_workers = [n for n in services if roles[n] == "worker" and n not in gpu]
    # The GPU and CPU workers are alternatives: each behind its own profile, the API always on.
    assert set(services[gpu[0]]["profiles"]).isdisjoint(services[cpu_workers[0]]["profiles"])
    assert "profiles" not in services[next(n for n in roles if roles[n] == "serve")]
    assert "profiles" not in compose["services"]["redis"]


def test_compose_commands_parse(compose, cli_parser, cli_subcommands):
    for service in _exclip_services(compose).values():
        check_command(service["command"], cli_parser, cli_subcommands)


def test_compose_env_is_read_by_the_service(compose, settings_cls, setting_env_names):
    for name, service in _exclip_services(compose).items():
        check_env(service["environment"], settings_cls, setting_env_names, f"compose {name}")


def test_compose_gpu_worker_reserves_an_nvidia_gpu_and_runs_on_cuda(compose):
    for name, service in _exclip_services(compose).items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        device_flag = flag(service["command"], "--device") or service["environment"].get("EXCLIP_DEVICE")
        if devices:
            assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
            assert service["image"].endswith("-cuda") and service["build"]["target"] == "cuda"
            assert device_flag.startswith("cuda")
        else:
            assert device_flag == "cpu", f"{name} has no GPU reserved, so it must run on cpu"
            assert service["image"].endswith("-cpu") and service["build"]["target"] == "cpu"


def test_compose_api_port_and_health_paths_match_the_app(compose, api_paths):
    (api,) = [s for s in _exclip_services(compose).values() if s["command"][0] == "serve"]
    port = flag(api["command"], "--port")
    host_port, container_port = api["ports"][0].split(":")
    assert container_port == port
    probe = " ".join(api["healthcheck"]["test"])
    paths = re.findall(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe)
    assert paths and all(p == port and path in api_paths for p, path in paths), probe


def test_compose_builds_name_existing_targets_matching_the_tag(compose):
    targets = _dockerfile_targets()
    for service in _exclip_services(compose).values():
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        assert build["target"] in targets
        assert service["image"] == f"{IMAGE_REPO}:{_version()}-{build['target']}"


def test_compose_redis_is_persistent_and_matches_redis_url(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])
    assert "ping" in redis["healthcheck"]["test"]
    for name, service in _exclip_services(compose).items():
        url = urlparse(service["environment"]["REDIS_URL"])
        assert (url.hostname, url.port) == ("redis", 6379), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_model_cache_volume(compose):
    for name, service in _exclip_services(compose).items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        check_cache(service["environment"], list(mounts), f"compose {name}")
        assert mounts[CACHE_MOUNT] in compose["volumes"], "the cache must be a named volume"


# ----------------------------------------------------------------------------------------------------
# Kubernetes


def _kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _by_name(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in _kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def _container_env(docs: list[dict], container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_by_name(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def _exclip_deployments(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in _kind(docs, "Deployment"):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        if container["image"].startswith(IMAGE_REPO + ":"):
            out[container["args"][0]] = d
    return out


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_k8s_has_api_and_worker_deployments(k8s_docs):
    assert sorted(_exclip_deployments(k8s_docs)) == ["serve", "worker"]
    for d in _kind(k8s_docs, "Deployment") + _kind(k8s_docs, "StatefulSet"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]


def test_k8s_commands_parse_and_env_is_read_by_the_service(
    k8s_docs, cli_parser, cli_subcommands, settings_cls, setting_env_names
):
    for role, deployment in _exclip_deployments(k8s_docs).items():
        container = _container(deployment)
        assert "command" not in container, "keep the image's ENTRYPOINT (exclip-service); pass args only"
        check_command(container["args"], cli_parser, cli_subcommands)
        check_env(_container_env(k8s_docs, container), settings_cls, setting_env_names, f"k8s {role}")


def test_k8s_api_ports_probes_service_and_hpa(k8s_docs, api_paths):
    api = _exclip_deployments(k8s_docs)["serve"]
    container = _container(api)
    (port,) = container["ports"]
    assert str(port["containerPort"]) == flag(container["args"], "--port")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in api_paths and get["port"] == port["name"], probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    services = [
        s
        for s in _kind(k8s_docs, "Service")
        if s["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(services) == 1 and services[0]["spec"]["ports"][0]["targetPort"] == port["name"]
    (hpa,) = _kind(k8s_docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_k8s_worker_requests_a_gpu_and_is_scaled_only_by_keda(k8s_docs):
    worker = _exclip_deployments(k8s_docs)["worker"]
    container = _container(worker)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert flag(container["args"], "--device").startswith("cuda") and container["image"].endswith("-cuda")
    # KEDA creates its own HPA for the worker: a second one would fight it.
    assert all(
        h["spec"]["scaleTargetRef"]["name"] != worker["metadata"]["name"]
        for h in _kind(k8s_docs, "HorizontalPodAutoscaler")
    )
    (scaled,) = _kind(k8s_docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]


def test_keda_trigger_reads_the_services_stream_and_group(k8s_docs, settings_cls, setting_env_names):
    from service import redis_keys

    worker = _exclip_deployments(k8s_docs)["worker"]
    env = _container_env(k8s_docs, _container(worker))
    settings = settings_cls(
        **{setting_env_names[k.upper()]: v for k, v in env.items() if k not in FOREIGN_ENV}
    )
    stream = redis_keys.Keys(settings.key_prefix).stream(settings.model)
    (scaled,) = _kind(k8s_docs, "ScaledObject")
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    redis_url = urlparse(settings.redis_url)
    namespace = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())["namespace"]
    redis_service = _by_name(k8s_docs, "Service", redis_url.hostname)
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["stream"] == stream, f"KEDA watches {meta['stream']}, workers read {stream}"
        assert meta["consumerGroup"] == redis_keys.GROUP
        # KEDA's operator runs in its own namespace: the address must be the Service's full DNS name.
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"{redis_url.hostname}.{namespace}.svc.cluster.local"
        assert int(port) == redis_url.port == redis_service["spec"]["ports"][0]["port"]
    lag = [t["metadata"] for t in triggers if "lagCount" in t["metadata"]]
    pending = [t["metadata"] for t in triggers if "pendingEntriesCount" in t["metadata"]]
    assert len(lag) == 1 and "activationLagCount" in lag[0]
    assert len(pending) == 1 and int(pending[0]["pendingEntriesCount"]) == settings.max_batch


def test_k8s_redis_is_persistent(k8s_docs):
    (redis,) = _kind(k8s_docs, "StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    major = int(container["image"].split(":")[1].split(".")[0])
    assert major >= 7, "KEDA's lagCount trigger needs Redis >= 7"
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/data"} in container["volumeMounts"]


def test_k8s_model_cache_and_non_root(k8s_docs):
    claims = {p["metadata"]["name"] for p in _kind(k8s_docs, "PersistentVolumeClaim")}
    for role, deployment in _exclip_deployments(k8s_docs).items():
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        check_cache(_container_env(k8s_docs, container), list(mounts), f"k8s {role}")
        (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[CACHE_MOUNT]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == security["fsGroup"] == _dockerfile_uid()


def test_compose_and_k8s_agree_on_images_redis_and_settings(compose, k8s_docs):
    compose_services = _exclip_services(compose)
    compose_images = {s["command"][0] + ":" + s["image"] for s in compose_services.values()}
    k8s_images = {role + ":" + _container(d)["image"] for role, d in _exclip_deployments(k8s_docs).items()}
    assert k8s_images <= compose_images, f"{k8s_images} vs {compose_images}"
    (redis_set,) = _kind(k8s_docs, "StatefulSet")
    assert (
        redis_set["spec"]["template"]["spec"]["containers"][0]["image"]
        == compose["services"]["redis"]["image"]
    )
    # Same model, weights, cache layout and queue tuning on both.
    k8s_env = _container_env(k8s_docs, _container(_exclip_deployments(k8s_docs)["worker"]))
    (gpu_worker,) = [s for s in compose_services.values() if s["image"].endswith("-cuda")]
    for name in (
        "EXCLIP_MODEL",
        "EXCLIP_PRETRAINED",
        "EXCLIP_CACHE_DIR",
        "HF_HOME",
        "EXCLIP_MAX_BATCH",
        "EXCLIP_VISIBILITY_TIMEOUT_S",
        "EXCLIP_JOB_TIMEOUT_S",
    ):
        assert k8s_env[name] == gpu_worker["environment"][name], name


def test_compose_and_k8s_run_the_api_with_the_measured_allocator_settings(compose, k8s_docs):
    # tests/service/test_api_memory.py measures the API with compose's values; the cluster runs the same.
    (api,) = [s for s in _exclip_services(compose).values() if s["command"][0] == "serve"]
    compose_malloc = {k: v for k, v in api["environment"].items() if k in MALLOC_ENV}
    assert set(compose_malloc) == MALLOC_ENV
    k8s_env = _container_env(k8s_docs, _container(_exclip_deployments(k8s_docs)["serve"]))
    assert {k: v for k, v in k8s_env.items() if k in MALLOC_ENV} == compose_malloc


MANIFESTS = [
    "docker-compose.yml",
    *sorted(f"deploy/k8s/{p.name}" for p in (ROOT / "deploy/k8s").glob("*.yaml")),
]


@pytest.mark.parametrize("path", MANIFESTS)
def test_every_manifest_is_listed_and_parses(path):
    docs = list(yaml.safe_load_all((ROOT / path).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs if d is not None)
    if path.startswith("deploy/k8s/") and not path.endswith("kustomization.yaml"):
        listed = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())["resources"]
        assert Path(path).name in listed, f"{path} is not applied by kustomization.yaml"


def test_worker_health_checks_agree(compose, k8s_docs):
    """One heartbeat check (exercised against live workers in test_topology.py) everywhere a worker runs."""
    workers = [s for s in _exclip_services(compose).values() if s["command"][0] == "worker"]
    commands = {tuple(s["healthcheck"]["test"][1:]) for s in workers}
    container = _container(_exclip_deployments(k8s_docs)["worker"])
    commands |= {tuple(container[p]["exec"]["command"]) for p in ("startupProbe", "livenessProbe")}
    assert len(commands) == 1, commands
    (command,) = commands
    from service.redis_keys import Keys

    assert command[:2] == ("python", "-c") and "+ ':workers'" in command[2]
    assert Keys("p").workers == "p:workers", "the health check builds the workers key as <prefix>:workers"


def _worker_settings(settings_cls, names: dict[str, str], env: dict[str, str]):
    return settings_cls(**{names[k.upper()]: v for k, v in env.items() if k not in FOREIGN_ENV})


def test_no_batch_outlives_the_visibility_timeout(compose, k8s_docs, settings_cls, setting_env_names):
    """The worker does not extend its claim while computing: a batch running longer than the visibility
    timeout is taken over by another worker and computed twice (and counts as a failed delivery)."""
    envs = {
        f"compose {n}": s["environment"]
        for n, s in _exclip_services(compose).items()
        if s["command"][0] == "worker"
    }
    envs["k8s worker"] = _container_env(k8s_docs, _container(_exclip_deployments(k8s_docs)["worker"]))
    for where, env in envs.items():
        s = _worker_settings(settings_cls, setting_env_names, env)
        assert s.visibility_timeout_s > s.job_timeout_s * s.max_batch, where


def test_keda_keeps_a_worker_while_the_api_needs_one_to_be_ready(k8s_docs, api_paths):
    """/readyz answers 503 without a live worker, so scaling workers to zero would starve the API."""
    api = _container(_exclip_deployments(k8s_docs)["serve"])
    (scaled,) = _kind(k8s_docs, "ScaledObject")
    if api["readinessProbe"]["httpGet"]["path"] == "/readyz":
        assert scaled["spec"]["minReplicaCount"] >= 1
        assert api_paths.client.get("/readyz").status_code == 503, "/readyz is ready without a worker"
