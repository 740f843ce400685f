"""deploy/nginx/nginx.conf: what it must say, and a real nginx's `nginx -t` on it.

The config targets nginx 1.27.3+ (the images run 1.28.0). Debian 12, which CI installs nginx
from, ships 1.22, so `nginx -t` there checks a copy in which each newer directive is spelled the
way that nginx knows (listed in NEWER_SYNTAX, each with the release that brought it); everything
else is checked as written. Both the compose config and the Kubernetes one are checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.deploy import (
    NGINX_CONF,
    load_deploy_module,
    nginx_directives,
    nginx_seconds,
    nginx_values,
    server_settings,
    upstream_servers,
)

render = load_deploy_module("render_nginx_configmap")
NGINX = shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx",) if Path(path).is_file()), None)


def drop_resolve(conf: str) -> str:
    """Before 1.27.3: no `resolve` parameter, so the upstream name must resolve at start-up."""
    adapted, count = re.subn(r"(?m)^(\s*server )\S+:(\d+) resolve;", r"\g<1>127.0.0.1:\2;", conf)
    assert count == 2, "nginx.conf no longer has the two `server HOST:PORT resolve;` this adapts"
    return adapted


def listen_http2(conf: str) -> str:
    """Before 1.25.1: HTTP/2 is a parameter of `listen`, not the `http2 on;` directive."""
    adapted, moved = re.subn(r"(?m)^(\s*listen \d+);\n\s*http2 on;\n", r"\1 http2;\n", conf)
    assert moved == 1, "nginx.conf no longer has the `listen` + `http2 on;` this adapts"
    return adapted


NEWER_SYNTAX: list[tuple[tuple[int, int, int], Callable[[str], str]]] = [
    ((1, 27, 3), drop_resolve),
    ((1, 25, 1), listen_http2),
]


def nginx_version(binary: str) -> tuple[int, int, int]:
    output = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", output)
    assert match, output
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def configs() -> dict[str, str]:
    compose = NGINX_CONF.read_text()
    return {"compose": compose, "kubernetes": render.kubernetes_nginx_conf(compose)}


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (`make services` installs it)")
@pytest.mark.parametrize("flavour", ["compose", "kubernetes"])
def test_nginx_accepts_the_config(flavour: str, tmp_path: Path) -> None:
    assert NGINX is not None
    version = nginx_version(NGINX)
    # nginx writes its pid and temp directories under /tmp: keep this run's in tmp_path.
    conf = configs()[flavour].replace("/tmp/", f"{tmp_path}/")
    # nginx looks a resolver given by name up when it starts; kube-dns exists only in a cluster.
    conf = conf.replace("resolver kube-dns.kube-system.svc.cluster.local ", "resolver 127.0.0.1 ")
    for since, adapt in NEWER_SYNTAX:
        if version < since:
            conf = adapt(conf)
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    result = subprocess.run(
        [NGINX, "-t", "-p", f"{tmp_path}/", "-e", "stderr", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_sessions_stick_to_one_replica() -> None:
    conf = NGINX_CONF.read_text()
    directives = nginx_directives(conf)
    # gRPC and HTTP: each door's upstream hashes the same key.
    assert nginx_values(conf, "hash") == [["$rnnserve_affinity_key", "consistent"]] * 2
    maps: dict[str, dict[str, list[str]]] = {}
    for blocks, name, arguments in directives:
        if blocks and blocks[-1].startswith("map "):
            maps.setdefault(blocks[-1], {})[name] = arguments
    # With a session id: that id. Else with a sequence id (x-sequence-id, KServe v2 sequences,
    # whose id is in the body): that id. Without either: a fresh random key per request, not one
    # replica for all.
    assert maps == {
        "map $http_x_session_id $rnnserve_affinity_key": {
            "": ["$rnnserve_sequence_key"],
            "default": ["$http_x_session_id"],
        },
        "map $http_x_sequence_id $rnnserve_sequence_key": {
            "": ["$request_id"],
            "default": ["sequence:$http_x_sequence_id"],
        },
    }
    grpc_upstream, http_upstream = [blocks[-1].split()[1] for blocks, name, _ in directives if name == "hash"]
    assert nginx_values(conf, "grpc_pass") == [[f"grpc://{grpc_upstream}"]]
    assert nginx_values(conf, "proxy_pass") == [[f"http://{http_upstream}"]]


def test_streams_outlive_the_session_idle_timeout() -> None:
    conf = NGINX_CONF.read_text()
    idle = server_settings({}).session_idle_timeout_s
    for name in (
        "grpc_read_timeout",
        "grpc_send_timeout",
        "proxy_read_timeout",
        "proxy_send_timeout",
        "client_body_timeout",
        "keepalive_timeout",
    ):
        (value,) = nginx_values(conf, name)
        assert nginx_seconds(value[0]) > idle, (
            f"{name} {value[0]} cuts sessions idle for less than {idle:.0f} s"
        )
    # A stream is one request body for as long as it lasts: it must have no size cap.
    assert nginx_values(conf, "client_max_body_size") == [["0"]]
    assert nginx_values(conf, "http2") == [["on"]]
    # Server-sent events pass through as they are written.
    assert nginx_values(conf, "proxy_buffering") == [["off"]]
    upstreams = upstream_servers(conf)
    assert len(upstreams) == 2 and all("resolve" in parameters for _, _, parameters in upstreams)
    assert nginx_values(conf, "resolver")
