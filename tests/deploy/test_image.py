"""deploy/Dockerfile builds the image the manifests expect, checked without Docker.

The final stage runs `gcks` (the package's console script) as a fixed non-root
user, keeps the data directory in a volume, exposes the ports the node listens
on, and its HEALTHCHECK, run here against a stand-in ops endpoint, passes only
on `200` from `/healthz`. The build stage copies what `pip install .` needs and
the build's ignore file lets exactly that through.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.deploy import dockerfile
from tests.deploy.kube import DEPLOY, K8S, REPO, load_documents, one

STAGE = dockerfile.final_stage()
IGNORE_FILE = DEPLOY / "Dockerfile.dockerignore"


def _base_config_ports() -> dict[str, tuple[int, str]]:
    statefulset = one(load_documents(K8S / "statefulset.yaml"), "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}


def _node_toml() -> dict[str, object]:
    config_map = one(load_documents(K8S / "configmap.yaml"), "ConfigMap")
    return tomllib.loads(config_map["data"]["node.toml"])


def test_entrypoint_is_the_gcks_console_script() -> None:
    assert dockerfile.last(STAGE, "ENTRYPOINT").exec_form() == ["gcks"]
    with (REPO / "pyproject.toml").open("rb") as project:
        scripts = tomllib.load(project)["project"]["scripts"]
    assert scripts["gcks"] == "gcks.cluster.cli:main"
    assert dockerfile.last(STAGE, "CMD").exec_form() == ["node", "--config", "/etc/gcks/node.toml"]


def test_base_image_is_python_311_slim() -> None:
    argument = next(i for i in dockerfile.instructions() if i.keyword == "ARG")
    name, _, default = argument.arguments.partition("=")
    assert name == "PYTHON_IMAGE"
    assert default.startswith("python:3.11-slim")
    assert all(
        i.arguments.startswith("${PYTHON_IMAGE}")
        for i in dockerfile.instructions()
        if i.keyword == "FROM"
    )


def test_image_runs_as_a_fixed_non_root_user() -> None:
    user, _, group = dockerfile.last(STAGE, "USER").arguments.partition(":")
    assert int(user) >= 1000
    assert int(group) >= 1000


def test_data_directory_is_a_volume_where_the_config_puts_it() -> None:
    assert dockerfile.last(STAGE, "VOLUME").exec_form() == [_node_toml()["data_dir"]]


def test_exposed_ports_are_the_container_ports() -> None:
    exposed = {
        (int(number), protocol.upper())
        for number, _, protocol in (
            item.partition("/") for item in dockerfile.last(STAGE, "EXPOSE").arguments.split()
        )
    }
    assert exposed == set(_base_config_ports().values())


def test_healthcheck_default_port_is_the_ops_port() -> None:
    environment = dockerfile.last(STAGE, "ENV").arguments
    assert f"HEALTHCHECK_OPS_PORT={_base_config_ports()['ops'][0]}" in environment.split()
    assert _node_toml()["ops_listen"] == f"0.0.0.0:{_base_config_ports()['ops'][0]}"


class _OpsStandIn(http.server.BaseHTTPRequestHandler):
    """Answers /healthz with the status the test sets; anything else is 404."""

    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the test reads no log
        pass


@contextmanager
def _ops_endpoint(status: int) -> Iterator[int]:
    handler = type("Handler", (_OpsStandIn,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _run_healthcheck(port: int) -> int:
    command = dockerfile.last(STAGE, "HEALTHCHECK").exec_form()
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        # A proxy in the environment must not capture the check (192.0.2.1: TEST-NET).
        env={"HEALTHCHECK_OPS_PORT": str(port), "HTTP_PROXY": "http://192.0.2.1:9"},
        capture_output=True,
        timeout=20,
        check=False,
    )
    return result.returncode


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (500, False)])
def test_healthcheck_passes_only_on_200_from_healthz(status: int, healthy: bool) -> None:
    with _ops_endpoint(status) as port:
        assert (_run_healthcheck(port) == 0) is healthy


def test_healthcheck_fails_when_nothing_listens() -> None:
    with _ops_endpoint(200) as port:
        pass  # closed again: the port is free
    assert _run_healthcheck(port) != 0


def test_build_copies_what_pip_install_needs_and_the_ignore_file_admits_it() -> None:
    build_stage = dockerfile.instructions()[: len(dockerfile.instructions()) - len(STAGE)]
    sources = [
        source
        for item in build_stage
        if item.keyword == "COPY" and not item.arguments.startswith("--from")
        for source in item.arguments.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "proto", "cluster", "member"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
    rules = [
        line.strip()
        for line in IGNORE_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    admitted = {rule.removeprefix("!").rstrip("/") for rule in rules if rule.startswith("!")}
    assert admitted == set(sources)


def test_healthcheck_command_is_valid_python() -> None:
    command = dockerfile.last(STAGE, "HEALTHCHECK").exec_form()
    assert command[1] == "-c"
    compile(command[2], "<HEALTHCHECK>", "exec")
