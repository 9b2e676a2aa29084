"""Process entry of an agent node: load agents, start a coordinator, stop on SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio

from .agent import Registration, registration_for
from .archive import archiving
from .config import CoordinatorConfig
from .coordinator import MultiAgentCoordinator
from .errors import ConfigError
from .telemetry import MeterProvider, TracerProvider

log = logging.getLogger("coordinator.node")


def load_agents(spec: str) -> list[Registration]:
    """Resolve ``MODULE:ATTR[=AGENT_ID]`` into registrations.

    ATTR may name an agent object or class, an async handler function (its name is the agent id unless
    ``=AGENT_ID`` is given) or a zero-argument factory returning one of those or a list.
    :raises ConfigError: with a one-line reason when the spec cannot be loaded
    """
    target, _, rename = spec.partition("=")
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--agent {spec!r}: expected MODULE:ATTR, e.g. agents.echo:echo")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like uvicorn: modules in the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--agent {spec!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"--agent {spec!r}: module {module_name!r} has no {attr!r}") from None
    if inspect.isclass(obj) or (callable(obj) and not inspect.iscoroutinefunction(obj)
                                and not hasattr(obj, "handle")):
        obj = obj()  # a class or a zero-argument factory
    items: Iterable[Any] = obj if isinstance(obj, (list, tuple)) else [obj]
    registrations = []
    for item in items:
        try:
            registration = item if isinstance(item, Registration) else registration_for(item)
        except TypeError as exc:
            raise ConfigError(f"--agent {spec!r}: {exc}") from None
        if rename:
            registration = Registration(rename, registration._call, topic=registration.topic,
                                        payload_type=registration.payload_type,
                                        concurrency=registration.concurrency)
        registrations.append(registration)
    return registrations


async def run_node(config: CoordinatorConfig, registrations: list[Registration], *,
                   tracer_provider: TracerProvider | None = None,
                   meter_provider: MeterProvider | None = None, archive: bool = True) -> None:
    """Serve ``registrations`` until SIGTERM or SIGINT, then stop gracefully.

    :param archive: also run the archiver group when the configuration archives events
        (``persistence.storage`` filesystem or postgres)
    """
    coordinator = MultiAgentCoordinator(config, tracer_provider=tracer_provider,
                                        meter_provider=meter_provider)
    for registration in registrations:
        coordinator.add(registration)
    async with archiving(coordinator, enabled=archive), coordinator:
        # What startup built (modules, agents, clients) lives as long as the process: moved out
        # of the collector's reach, a full collection pauses the node for ~0.1 ms, not ~10.
        gc.freeze()
        agents = ", ".join(sorted({r.agent_id for r in registrations}))
        log.info("node %s ready: agents [%s], concurrency %d", coordinator.node_id, agents,
                 config.delivery.concurrency, extra={"node_id": coordinator.node_id})
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("node %s stopping (%s): draining in-flight work",
                         coordinator.node_id, signal.Signals(signum).name)
                break
    log.info("node %s stopped", coordinator.node_id)
