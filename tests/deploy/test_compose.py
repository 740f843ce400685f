"""docker-compose.yml, checked without a Docker engine.

The file must validate against the Compose Specification's JSON Schema, and everything it names
must exist and agree: build targets with the Dockerfile, bind-mounted files with the tree, named
volumes with their declarations, ports and variables with the server's settings, the nginx
upstream with the replica service, and Prometheus' targets with the servers' metrics port.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.deploy import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    DOCKERFILE,
    DOTENV,
    IMAGE_UID,
    NGINX_CONF,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
    Dockerfile,
    assert_flags_exist,
    default_setting,
    image_environment,
    nginx_seconds,
    nginx_values,
    project_version,
    server_settings,
    setting,
    upstream_servers,
)

SERVER_SERVICES = ("server", "server-gpu", "replica")
EXPECTED_PROFILES = {
    "models": [],
    "server": ["server"],
    "server-gpu": ["gpu"],
    "train": ["train"],
    "export": ["train"],
    "prometheus": ["monitoring"],
    "grafana": ["monitoring"],
    "replica": ["scale"],
    "nginx": ["scale"],
    "redis": ["scale"],
}

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: Any, environment: Mapping[str, str]) -> Any:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default} and $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environment) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op = match.group("name"), match.group("op")
        current = environment.get(name)
        if op == ":-" and not current:
            return match.group("default")
        if op == "-" and current is None:
            return match.group("default")
        assert current is not None, f"${{{name}}} has no default; `docker compose up` would warn and use ''"
        return current

    return _VARIABLE.sub(replace, value)


def compose_with(environment: Mapping[str, str]) -> dict[str, Any]:
    """docker-compose.yml as `docker compose config` sees it with ENVIRONMENT's variables set."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(interpolate(loaded, environment))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as `docker compose config` sees it with no variables set."""
    return compose_with({})


def dotenv() -> dict[str, str]:
    """The project's .env file, which Compose reads for interpolation and COMPOSE_PROFILES."""
    pairs = {}
    for raw in DOTENV.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def started_services(
    services: Mapping[str, Mapping[str, Any]], profiles: list[str], named: tuple[str, ...] = ()
) -> set[str]:
    """What `docker compose [--profile P ...] up [NAMED ...]` starts: the services without a
    profile or in an active one (or only NAMED, when given), plus everything they depend on."""
    wanted = list(named) or [
        name
        for name, service in services.items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    ]
    started: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in started:
            started.add(name)
            wanted += list(services[name].get("depends_on", {}))
    return started


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def stages() -> list[str]:
    return Dockerfile.read(DOCKERFILE).stage_names


def published_ports(service: Mapping[str, Any]) -> list[tuple[int | None, int]]:
    """(host port or None, container port) of each short-syntax `ports` entry."""
    ports = []
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        ports.append((int(parts[-2]) if len(parts) > 1 else None, int(parts[-1])))
    return ports


def host_addresses(service: Mapping[str, Any]) -> list[str]:
    """The host address of each short-syntax `ports` entry ('' where every interface)."""
    return [":".join(str(entry).split(":")[:-2]) for entry in service.get("ports", [])]


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume."""
    found = []
    for entry in service.get("volumes", []):
        source, target, *mode = str(entry).split(":")
        found.append((source, target, "ro" in mode))
    return found


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """The environment a service's containers start with: the image's ENV, then compose's."""
    environment = {}
    build = service.get("build")
    if isinstance(build, dict):
        environment.update(image_environment(build["target"]))
    declared = service.get("environment", {})
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared)
    environment.update({key: str(value) for key, value in declared.items()})
    return environment


def test_compose_file_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)

    # The schema is strict enough to catch a misspelled key, so the check above means something.
    broken = copy.deepcopy(compose)
    broken["services"]["server"]["prots"] = ["50051:50051"]
    assert not validator.is_valid(broken)


def test_services_are_in_their_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert {name: service.get("profiles", []) for name, service in services.items()} == EXPECTED_PROFILES


def test_profiles_start_only_what_they_need(services: dict[str, dict[str, Any]]) -> None:
    # A plain `docker compose up` takes its profiles from .env; any --profile flag replaces them.
    default = dotenv()["COMPOSE_PROFILES"].split(",")
    assert started_services(services, default) == {"models", "server"}
    assert started_services(services, ["scale"]) == {"models", "replica", "nginx", "redis"}
    assert started_services(services, ["server", "monitoring"]) == {
        "models",
        "server",
        "prometheus",
        "grafana",
    }
    assert started_services(services, ["gpu"], ("server-gpu",)) == {"models", "server-gpu"}
    assert started_services(services, ["train"], ("export",)) == {"export", "train"}


def test_ports_are_published_on_loopback_unless_asked(services: dict[str, dict[str, Any]]) -> None:
    published = {name: host_addresses(service) for name, service in services.items() if "ports" in service}
    assert set(published) == {"server", "server-gpu", "prometheus", "grafana", "nginx"}
    for name, addresses in published.items():
        assert addresses and set(addresses) == {"127.0.0.1"}, f"{name} publishes on {addresses}"
    everywhere = compose_with({"RNNSERVE_PUBLISH_HOST": "0.0.0.0"})["services"]
    for name in published:
        assert set(host_addresses(everywhere[name])) == {"0.0.0.0"}, name


def test_builds_name_existing_dockerfiles_and_targets(
    services: dict[str, dict[str, Any]], stages: list[str]
) -> None:
    built = {name: service for name, service in services.items() if "build" in service}
    assert set(built) == {"models", "server", "server-gpu", "train", "export", "replica"}
    for name, service in built.items():
        build = service["build"]
        context = (REPO_ROOT / build["context"]).resolve()
        assert context == REPO_ROOT, f"{name}: the build context must be the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        assert build["target"] in stages, (
            f"{name}: target {build['target']!r} is not a stage of the Dockerfile"
        )
        # Built images carry the project's version, so `docker image ls` says what runs.
        repository, _, tag = service["image"].partition(":")
        assert repository == f"rnnserve/{build['target']}" and tag == project_version(), name


def test_third_party_images_are_pinned_to_exact_versions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), (
            f"{name}: image {image!r} is not pinned to an exact version"
        )


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in compose["services"].items():
        for source, target, _ in mounts(service):
            assert target.startswith("/"), f"{name}: mount target {target!r} is not absolute"
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).is_file(), f"{name}: bind-mounted {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared under volumes:"
                used.add(source)
    assert used == declared, f"declared but never mounted: {sorted(declared - used)}"


def test_servers_agree_with_the_server_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in SERVER_SERVICES:
        service = services[name]
        environment = service_environment(service)
        settings = server_settings(environment)
        assert settings.host == "0.0.0.0", (
            f"{name}: the server must listen on every interface of its container"
        )
        # The repository is where the `models` volume is mounted, read-only for a server.
        assert (("models", str(settings.repository), True)) in mounts(service), name
        container_ports = {port for _, port in published_ports(service)} | {
            int(p) for p in service.get("expose", [])
        }
        assert settings.port in container_ports, f"{name}: gRPC port {settings.port} is not published"
        metrics_port = setting(settings, environment, "metrics_port")
        assert metrics_port in container_ports, f"{name}: metrics port {metrics_port} is not published"
        http_port = setting(settings, environment, "http_port")
        assert http_port in container_ports, f"{name}: HTTP port {http_port} is not published"
        assert settings.port == default_setting("port") and metrics_port == default_setting("metrics_port")
        # No TLS or tokens here, so /metrics would stay on the container's loopback unless told.
        assert settings.metrics_bind_host == "0.0.0.0", f"{name}: Prometheus could not reach /metrics"
        # Compose waits this long after SIGTERM before SIGKILL: the drain must fit in it.
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) > settings.grace_period_s, name
        assert service["depends_on"]["models"]["condition"] == "service_completed_successfully", name
    assert service_environment(services["server"])["RNNSERVE_DEVICE"] == "cpu"
    assert service_environment(services["server-gpu"])["RNNSERVE_DEVICE"] == "cuda"


def test_host_ports_do_not_collide(services: dict[str, dict[str, Any]]) -> None:
    host_ports = [host for service in services.values() for host, _ in published_ports(service) if host]
    assert len(host_ports) == len(set(host_ports)), f"a host port is published twice: {sorted(host_ports)}"
    assert published_ports(services["server"]) == [(50051, 50051), (8000, 8000), (9400, 9400)]
    assert all(
        str(entry).startswith("127.0.0.1:")
        for service in services.values()
        for entry in service.get("ports", [])
        if str(entry).split(":")[-1] == "9400"
    ), "an unprotected /metrics is published beyond the host's loopback"
    # Replicas publish nothing: a fixed host port could be held by one container only.
    assert published_ports(services["replica"]) == []


def test_models_service_bootstraps_the_server_repository(services: dict[str, dict[str, Any]]) -> None:
    models = services["models"]
    assert models["build"]["target"] == "train"
    assert models["entrypoint"] == ["python", "-m", "export.bootstrap"]
    command = models["command"]
    repository = command[command.index("--repository") + 1]
    checkpoints = command[command.index("--checkpoints") + 1]
    assert ("models", repository, False) in mounts(models)
    assert ("checkpoints", checkpoints, False) in mounts(models)
    server_repository = server_settings(service_environment(services["server"])).repository
    assert Path(repository) == server_repository
    assert models["restart"] == "no"


def test_train_and_export_share_the_checkpoint_and_repository(services: dict[str, dict[str, Any]]) -> None:
    train, export = services["train"]["command"], services["export"]["command"]
    assert train[0] == "train" and export[0] == "export"
    checkpoint = train[train.index("--out") + 1]
    assert export[1] == checkpoint, "export must read the checkpoint that train writes"
    assert checkpoint.startswith("/checkpoints/") and ("checkpoints", "/checkpoints", False) in mounts(
        services["train"]
    )
    assert export[export.index("--repository") + 1] == "/models"
    assert ("models", "/models", False) in mounts(services["export"])
    assert services["export"]["depends_on"]["train"]["condition"] == "service_completed_successfully"


def test_gpu_server_reserves_an_nvidia_device(services: dict[str, dict[str, Any]]) -> None:
    service = services["server-gpu"]
    assert service["build"]["target"] == "serve-gpu"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)


def test_scale_profile_wires_nginx_to_the_replicas_and_redis(services: dict[str, dict[str, Any]]) -> None:
    replica = services["replica"]
    assert replica["deploy"]["replicas"] >= 2
    environment = service_environment(replica)
    settings = server_settings(environment)
    redis_url = setting(settings, environment, "redis_url")
    assert re.fullmatch(r"redis://redis:6379/\d+", redis_url), redis_url
    assert "redis" in replica["depends_on"]

    conf = NGINX_CONF.read_text()
    http_port = setting(settings, environment, "http_port")
    assert upstream_servers(conf) == [
        ("replica", settings.port, ["resolve"]),
        ("replica", http_port, ["resolve"]),
    ]
    listens = [int(listen[0]) for listen in nginx_values(conf, "listen")]
    assert [port for _, port in published_ports(services["nginx"])] == listens == [settings.port, http_port]
    # Docker's embedded DNS server, re-asked often enough to see replicas come and go.
    (resolver,) = nginx_values(conf, "resolver")
    assert resolver[0] == "127.0.0.11" and "valid=10s" in resolver
    assert ("./deploy/nginx/nginx.conf", "/etc/nginx/nginx.conf", True) in mounts(services["nginx"])
    assert services["nginx"]["depends_on"]["replica"]["condition"] == "service_healthy"
    for timeout in ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout"):
        (value,) = nginx_values(conf, timeout)
        assert nginx_seconds(value[0]) > settings.session_idle_timeout_s, timeout


def test_prometheus_scrapes_every_server(services: dict[str, dict[str, Any]]) -> None:
    assert ("./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", True) in mounts(
        services["prometheus"]
    )
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    names: list[str] = []
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for discovery in job["dns_sd_configs"]:
            assert discovery["type"] == "A"
            assert discovery["port"] == default_setting("metrics_port")
            names += discovery["names"]
    assert sorted(names) == sorted(SERVER_SERVICES)


def test_server_containers_are_locked_down(services: dict[str, dict[str, Any]]) -> None:
    for name in SERVER_SERVICES:
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["init"] is True, name
        assert "user" not in service, f"{name}: runs as the image's user {IMAGE_UID}"
        # The image's HEALTHCHECK (rnnserve health) stays in force.
        assert "healthcheck" not in service, name


def test_one_shot_commands_use_existing_flags(services: dict[str, dict[str, Any]]) -> None:
    from serving.cli import SUBCOMMANDS

    models = services["models"]
    assert models["entrypoint"][1:] == ["-m", "export.bootstrap"]
    assert_flags_exist(models["command"], "export.bootstrap")
    for name in ("train", "export"):
        command = services[name]["command"]
        assert command[0] in SUBCOMMANDS, f"{name}: rnnserve has no command {command[0]!r}"
        assert_flags_exist(command[1:], SUBCOMMANDS[command[0]][0])
