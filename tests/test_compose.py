"""docker-compose.yml: `docker compose config` where a client can, else a structural check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def test_compose_structure():
    data = yaml.safe_load(COMPOSE.read_text())
    services = data["services"]
    assert {"postgres", "ray-head", "ray-worker", "dashboard", "orchestrator"} <= set(services)
    assert "pgdata" in data["volumes"]
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert "5432:5432" in services["postgres"]["ports"] and "8080:8080" in services["dashboard"]["ports"]
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    url = services["orchestrator"]["environment"]["STORAGE_URL"]
    assert url.startswith("postgresql+psycopg2://") and url.endswith("@postgres:5432/studies")
    assert url in services["dashboard"]["command"]  # dashboard and orchestrator share one store
    assert "--workers" in services["orchestrator"]["command"]
    assert "ray start --head" in services["ray-head"]["command"]
    assert "ray-head:6379" in services["ray-worker"]["command"]


def test_compose_config_validates_where_a_client_can():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker client has no compose plugin")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
