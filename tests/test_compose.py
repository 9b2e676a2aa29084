"""compose.yaml cannot run here (no container engine), so check what can go wrong in it: every
command parses with the real CLI parser, every --agent spec loads, and Redis is set up as the
README says (persistent, health-checked, nodes wait for it)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.cli import build_parser, config_from_args
from coordinator.runtime import load_agents

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _node_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items()
            if "command" in s and _command(s)[:1] == ["coordinator"]}


def _parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports the problem on stderr
        raise AssertionError(f"`coordinator {shlex.join(argv)}` is rejected") from exc


def test_every_node_command_parses_and_its_agents_load(compose: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the image's working directory holds agents/, like the checkout
    served: dict[str, set[str]] = {}
    for name, service in _node_services(compose).items():
        args = _parse(_command(service)[1:])
        assert args.command == "node", name
        for spec in args.agent:
            registrations = load_agents(spec)
            assert registrations, spec
            served.setdefault(name, set()).update(r.agent_id for r in registrations)
    assert served == {"counter": {"counter"}, "echo": {"echo"}}


def test_nodes_reach_the_compose_redis(compose: dict[str, Any],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _node_services(compose).items():
        for var in [v for v in os.environ if v.startswith("KIKI_")]:
            monkeypatch.delenv(var)
        for var, value in service.get("environment", {}).items():
            monkeypatch.setenv(var, str(value))
        config = config_from_args(_parse(_command(service)[1:]))
        assert config.redis.url == "redis://redis:6379/0", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["build"] in (".", {"context": "."}), name


def test_replicas_and_redis_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["counter"].get("deploy", {}).get("replicas") == 2
    assert services["echo"].get("deploy", {}).get("replicas", 1) == 1
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert "--appendonly" in _command(redis) and "yes" in _command(redis)
    assert redis["healthcheck"]["test"]
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", []))


def test_dockerfile_installs_the_package_with_the_reference_agents() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "pip install -e ." in text and "[embedded]" not in text
    assert "COPY agents" in text and "COPY coordinator" in text
