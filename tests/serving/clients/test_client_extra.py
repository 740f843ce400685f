"""The `client` extra is enough for the client: serving.clients.client and the client commands import
without onnxruntime, redis, prometheus-client or torch, and need no distribution beyond the
extra's requirements (and what those require)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[3]
CLIENT_MODULES = (
    "serving.clients.client",
    "serving.clients.generate",
    "serving.clients.health",
    "serving.clients.models_cli",
)
# grpc imports grpc_tools and grpc_reflection when they are there, and goes on without them.
BLOCKED = ("onnxruntime", "onnx", "redis", "prometheus_client", "torch", "grpc_tools", "grpc_reflection")

# Runs in a fresh interpreter: a meta path hook refuses the server's dependencies, then the client
# modules are imported; prints the distributions of every regular top-level package loaded.
PROBE = """
import importlib, importlib.abc, json, sys
from importlib import metadata

BLOCKED = {blocked!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not part of the client extra", name=name)
        return None

already = set(sys.modules)  # the interpreter's own start (site hooks)
sys.meta_path.insert(0, Refuse())
for module in {modules!r}:
    importlib.import_module(module)
owners = metadata.packages_distributions()
loaded = set()
for name, module in list(sys.modules.items()):
    top = name.partition(".")[0]
    if name == top and name not in already and getattr(module, "__file__", None) and top in owners:
        loaded.update(owners[top])
print(json.dumps(sorted(loaded)))
"""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])


def allowed_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = {
        requirement_name(r) for r in [*project["dependencies"], *project["optional-dependencies"]["client"]]
    }
    allowed = {normalized(project["name"]), *direct}
    for name in direct:
        for requirement in metadata.requires(name) or []:
            if "extra ==" not in requirement:
                allowed.add(requirement_name(requirement))
    return allowed


def test_the_client_imports_without_the_server_dependencies() -> None:
    probe = PROBE.format(blocked=BLOCKED, modules=CLIENT_MODULES)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = {normalized(name) for name in json.loads(result.stdout)}
    assert {"grpcio", "grpcio-status", "grpcio-health-checking"} <= loaded  # (google.* is a namespace)
    assert loaded <= allowed_distributions(), "the client needs distributions outside the client extra"


def test_the_client_extra_leaves_out_the_server_runtime() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = {requirement_name(r) for r in project["optional-dependencies"]["client"]}
    assert client.isdisjoint(
        {"onnxruntime", "onnx", "redis", "prometheus-client", "torch", "grpcio-reflection"}
    )
    assert {"grpcio", "grpcio-status", "protobuf", "grpcio-health-checking"} <= client
