"""The Kubernetes manifests in deploy/k8s/, checked without a cluster.

Every object validates against the Kubernetes API schemas (strict: no unknown fields) of the
oldest release the manifests need (1.27: gRPC probes) and of the newest the validator knows;
then the objects are checked against each other (selectors, ports, volumes, names) and against
the server's settings, the compose file's images and the nginx config.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.deploy import (
    COMPOSE_FILE,
    IMAGE_UID,
    K8S_DIR,
    NGINX_CONF,
    assert_flags_exist,
    default_setting,
    load_deploy_module,
    nginx_seconds,
    nginx_values,
    server_settings,
    setting,
    upstream_servers,
)

render = load_deploy_module("render_nginx_configmap")

KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
NAMESPACE = "rnnserve"


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return [
        document for path in manifest_files() for document in yaml.safe_load_all(path.read_text()) if document
    ]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [item for item in objects if item["kind"] == kind and item["metadata"]["name"] == name]
    return found


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [item for item in pod_spec["containers"] if item["name"] == name]
    return found


def environment(container_spec: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container_spec.get("env", [])}


def container_port(container_spec: dict[str, Any], port: int | str) -> int:
    """A port by number or by name, as a Service's targetPort or a probe names it."""
    for item in container_spec.get("ports", []):
        if port in (item["containerPort"], item.get("name")):
            return int(item["containerPort"])
    raise AssertionError(f"container {container_spec['name']} has no port {port!r}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(
    objects: list[dict[str, Any]], version: str
) -> None:
    failures = []
    for item in objects:
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(
                f"{item['kind']}/{item['metadata']['name']}: {'/'.join(map(str, error.path))}: {error}"
            )
    assert not failures, "\n".join(failures)


def test_kustomization_lists_every_manifest_in_one_namespace(objects: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in manifest_files()]
    assert kustomization["namespace"] == NAMESPACE
    for item in objects:
        if item["kind"] != "Namespace":
            assert item["metadata"]["namespace"] == NAMESPACE, item["metadata"]["name"]
    assert Counter(item["kind"] for item in objects) == {
        "Namespace": 1,
        "PersistentVolumeClaim": 1,
        "Job": 1,
        "Deployment": 3,
        "Service": 3,
        "ConfigMap": 1,
    }


def test_selectors_match_their_pods_and_ports(objects: list[dict[str, Any]]) -> None:
    deployments = [item for item in objects if item["kind"] == "Deployment"]
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (item for item in objects if item["kind"] == "Service"):
        selector = service["spec"]["selector"]
        chosen = [
            d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {len(chosen)} Deployments"
        (pod_container,) = chosen[0]["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            assert container_port(pod_container, port["targetPort"]) == port["port"]


def test_every_container_requests_resources_and_runs_unprivileged(objects: list[dict[str, Any]]) -> None:
    for item in objects:
        if item["kind"] not in ("Deployment", "Job"):
            continue
        pod = item["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for spec in pod.get("initContainers", []) + pod["containers"]:
            resources = spec["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], spec[
                "name"
            ]
            assert spec["securityContext"]["allowPrivilegeEscalation"] is False
            assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert ":" in spec["image"] and not spec["image"].endswith(":latest"), spec["image"]
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for spec in pod.get("initContainers", []) + pod["containers"]:
            for mount in spec.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{spec['name']} mounts undefined volume {mount['name']}"
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            if "configMap" in volume:
                find(objects, "ConfigMap", volume["configMap"]["name"])


def test_server_deployment_agrees_with_the_server_settings(objects: list[dict[str, Any]]) -> None:
    deployment = find(objects, "Deployment", "rnnserve")
    pod = deployment["spec"]["template"]["spec"]
    server = container(pod, "server")
    env = environment(server)
    settings = server_settings(env)
    assert settings.host == "0.0.0.0"
    assert container_port(server, "grpc") == settings.port == default_setting("port")
    assert container_port(server, "metrics") == setting(settings, env, "metrics_port")
    assert container_port(server, "http") == setting(settings, env, "http_port")
    assert settings.metrics_bind_host == "0.0.0.0"  # else /metrics stays on the pod's loopback
    for probe in ("startupProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == settings.port, probe
    # Readiness: KServe v2's HTTP readiness endpoint, which answers 503 while draining.
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert pod["terminationGracePeriodSeconds"] > settings.grace_period_s
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    mounts = {mount["mountPath"]: mount for mount in server["volumeMounts"]}
    assert mounts[str(settings.repository)]["readOnly"] is True
    assert deployment["spec"]["replicas"] >= 2

    redis_service = find(objects, "Service", "rnnserve-redis")
    redis_port = redis_service["spec"]["ports"][0]["port"]
    assert setting(settings, env, "redis_url") == f"redis://rnnserve-redis:{redis_port}/0"


def test_models_job_fills_the_repository_the_servers_read(objects: list[dict[str, Any]]) -> None:
    job_pod = find(objects, "Job", "rnnserve-models")["spec"]["template"]["spec"]
    (bootstrap,) = job_pod["containers"]
    assert bootstrap["command"] == ["python", "-m", "export.bootstrap"]
    assert_flags_exist(bootstrap["args"], "export.bootstrap")
    repository = bootstrap["args"][bootstrap["args"].index("--repository") + 1]
    server_pod = find(objects, "Deployment", "rnnserve")["spec"]["template"]["spec"]
    claims = {
        pod_name: {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        for pod_name, pod in (("job", job_pod), ("server", server_pod))
    }
    job_mounts = {mount["mountPath"]: mount["name"] for mount in bootstrap["volumeMounts"]}
    server_mounts = {
        mount["mountPath"]: mount["name"] for mount in container(server_pod, "server")["volumeMounts"]
    }
    assert claims["job"][job_mounts[repository]] == claims["server"][server_mounts[repository]]
    assert job_pod["securityContext"]["fsGroup"] == IMAGE_UID


def test_images_are_the_ones_compose_builds(objects: list[dict[str, Any]]) -> None:
    compose_images = {
        service["image"] for service in yaml.safe_load(COMPOSE_FILE.read_text())["services"].values()
    }
    for item in objects:
        if item["kind"] in ("Deployment", "Job"):
            pod = item["spec"]["template"]["spec"]
            for spec in pod.get("initContainers", []) + pod["containers"]:
                assert spec["image"] in compose_images, spec["image"]


def test_nginx_configmap_is_generated_from_the_nginx_conf(objects: list[dict[str, Any]]) -> None:
    configmap = find(objects, "ConfigMap", render.CONFIGMAP_NAME)
    conf = configmap["data"]["nginx.conf"]
    assert conf == render.kubernetes_nginx_conf(NGINX_CONF.read_text()), (
        "deploy/k8s/nginx-configmap.yaml is out of date: run python deploy/render_nginx_configmap.py"
    )
    assert (K8S_DIR / "nginx-configmap.yaml").read_text() == render.render()
    # Only the marked lines differ from the compose config.
    compose_lines = NGINX_CONF.read_text().splitlines()
    changed = [line for line in conf.splitlines() if line not in compose_lines]
    assert len(changed) == len(render.KUBERNETES_LINES)


def test_nginx_reaches_the_replicas_through_the_headless_service(objects: list[dict[str, Any]]) -> None:
    configmap = find(objects, "ConfigMap", render.CONFIGMAP_NAME)
    conf = configmap["data"]["nginx.conf"]
    headless = find(objects, "Service", render.HEADLESS_SERVICE)
    assert headless["spec"]["clusterIP"] == "None"
    ports = {port["name"]: port["port"] for port in headless["spec"]["ports"]}
    fqdn = f"{headless['metadata']['name']}.{headless['metadata']['namespace']}.svc.cluster.local"
    assert upstream_servers(conf) == [(fqdn, ports["grpc"], ["resolve"]), (fqdn, ports["http"], ["resolve"])]
    (resolver,) = nginx_values(conf, "resolver")
    assert resolver[0] == "kube-dns.kube-system.svc.cluster.local"

    nginx = find(objects, "Deployment", "rnnserve-nginx")
    pod = nginx["spec"]["template"]["spec"]
    (nginx_container,) = pod["containers"]
    grpc_listen, http_listen = nginx_values(conf, "listen")
    assert container_port(nginx_container, "grpc") == int(grpc_listen[0])
    assert container_port(nginx_container, "http") == int(http_listen[0])
    service = find(objects, "Service", "rnnserve")
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {
        "grpc": int(grpc_listen[0]),
        "http": int(http_listen[0]),
    }
    (config_volume,) = [volume for volume in pod["volumes"] if "configMap" in volume]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    (config_mount,) = [
        mount for mount in nginx_container["volumeMounts"] if mount["name"] == config_volume["name"]
    ]
    assert (config_mount["mountPath"], config_mount["subPath"]) == ("/etc/nginx/nginx.conf", "nginx.conf")
    # nginx writes only under /tmp (pid, temp files): an emptyDir there, the rest read-only.
    (pid,) = nginx_values(conf, "pid")
    assert pid[0].startswith("/tmp/")
    assert any(mount["mountPath"] == "/tmp" for mount in nginx_container["volumeMounts"])
    assert nginx_container["securityContext"]["readOnlyRootFilesystem"] is True

    settings = server_settings({})
    for timeout in ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout"):
        (value,) = nginx_values(conf, timeout)
        assert nginx_seconds(value[0]) > settings.session_idle_timeout_s, timeout
