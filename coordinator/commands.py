"""The work behind each CLI command (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from .cli import config_from_args, emit
from .coordinator import MultiAgentCoordinator
from .envelope import AgentEvent
from .events import after_id, matches, read_events
from .errors import ConfigError, CoordinatorError
from .keys import Keys
from .registry import Registry, now_ms
from .runtime import load_agents, run_node
from .status import agent_statuses, topic_statuses
from .transport import RedisTransport


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r]
                                            for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _raw_payload(obj: Any) -> Any:
    """to_builtins hook: a dead letter's envelope payload (msgspec.Raw) as its decoded value."""
    if isinstance(obj, msgspec.Raw):
        from . import codec

        try:
            return codec.decode_payload(obj)
        except CoordinatorError:
            return {"undecodable_bytes": len(obj)}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _age(ms: int | None) -> str | None:
    return None if ms is None else f"{ms / 1000:.1f}s"


async def node(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    registrations = [r for spec in args.agent for r in load_agents(spec)]
    if args.metrics_port is None and not args.otlp_endpoint:
        await run_node(config, registrations, archive=args.archive)
        return 0
    from .telemetry_export import NodeExporters

    exporters = NodeExporters(node_id=config.node_id, metrics_port=args.metrics_port,
                              otlp_endpoint=args.otlp_endpoint)
    exporters.install_globally()  # this process is the application: agents' spans go too
    try:
        await run_node(config, registrations, tracer_provider=exporters.tracer_provider,
                       meter_provider=exporters.meter_provider, archive=args.archive)
    finally:
        exporters.close()
    return 0


async def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(args.redis_url, args.messages)


async def _connect(args: argparse.Namespace) -> tuple[RedisTransport, Keys, Registry]:
    config = config_from_args(args)
    transport = await RedisTransport.connect(config.redis)
    keys = Keys(config.redis.prefix)
    return transport, keys, Registry(transport, keys, config.delivery.heartbeat_ttl_ms)


async def agents(args: argparse.Namespace) -> int:
    transport, keys, registry = await _connect(args)
    try:
        found = await agent_statuses(transport, keys, await registry.nodes())
    finally:
        await transport.close()
    rows = [(a.agent_id, ",".join(a.nodes) or "(none)", a.backlog, a.pending,
             _age(a.oldest_pending_age_ms), a.dead_letters) for a in found]
    emit(args, msgspec.to_builtins(found),
         table(["AGENT", "NODES", "BACKLOG", "PENDING", "OLDEST", "DEAD"], rows))
    return 0


async def status(args: argparse.Namespace) -> int:
    transport, keys, registry = await _connect(args)
    try:
        nodes = await registry.nodes()
        found = await agent_statuses(transport, keys, nodes)
        topics = await topic_statuses(transport, keys)
    finally:
        await transport.close()
    now = now_ms()
    data = {"nodes": msgspec.to_builtins(nodes), "agents": msgspec.to_builtins(found),
            "topics": msgspec.to_builtins(topics)}
    parts = [
        table(["NODE", "HOST", "PID", "AGENTS", "UP", "LAST BEAT"],
              [(n.node_id, n.host, n.pid, ",".join(n.agents), _age(now - n.started_ms),
                _age(now - n.beat_ms)) for n in nodes]),
        table(["INBOX", "NODES", "BACKLOG", "PENDING", "OLDEST PENDING", "DEAD LETTERS"],
              [(a.agent_id, len(a.nodes), a.backlog, a.pending, _age(a.oldest_pending_age_ms),
                a.dead_letters) for a in found]),
    ]
    if topics:
        parts.append(table(["TOPIC", "LENGTH", "GROUPS", "BACKLOG", "DEAD LETTERS"],
                           [(t.name, t.length, ",".join(g.group for g in t.groups), t.backlog,
                             t.dead_letters) for t in topics]))
    emit(args, data, "\n\n".join(parts))
    return 0


async def send(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"payload is not valid JSON: {exc}") from None
    async with MultiAgentCoordinator(config_from_args(args)) as coordinator:
        if args.wait:
            reply = await coordinator.request(args.agent, payload, timeout=args.timeout,
                                              session_id=args.session)
            emit(args, {"reply": reply}, json.dumps(reply, default=str))
        else:
            message_id = await coordinator.send(args.agent, payload, session_id=args.session)
            emit(args, {"message_id": message_id}, message_id)
    return 0


async def dlq(args: argparse.Namespace) -> int:
    async with MultiAgentCoordinator(config_from_args(args)) as coordinator:
        letters = coordinator.dead_letters(args.agent, topic=args.topic)
        ids = args.ids or None
        if args.action in ("redrive", "purge") and ids is None and not args.all:
            raise ConfigError(f"dlq {args.action} with no ids needs --all to confirm")
        if args.action == "list":
            found = await letters.list(count=1000)
            rows = [(d.id, d.reason, d.error_type, d.error[:60], d.deliveries, d.consumer)
                    for d in found]
            emit(args, msgspec.to_builtins(found, enc_hook=_raw_payload),
                 table(["ID", "REASON", "ERROR", "MESSAGE", "DELIVERIES", "NODE"], rows))
        elif args.action == "show":
            if not args.ids:
                raise ConfigError("dlq show needs a dead-letter id")
            letter = await letters.show(args.ids[0])
            if letter is None:
                raise ConfigError(f"no dead letter {args.ids[0]!r} for agent {args.agent!r}")
            data = msgspec.to_builtins(letter, enc_hook=_raw_payload)
            if letter.envelope is not None:
                from . import codec

                data["payload"] = codec.decode_payload(letter.envelope.payload)
            emit(args, data, json.dumps(data, indent=2, default=str))
        elif args.action == "redrive":
            moved, skipped = await letters.redrive(ids)
            emit(args, {"redriven": moved, "skipped": skipped},
                 f"redriven: {moved}" + (f"; skipped (no intact envelope): {skipped}"
                                         if skipped else ""))
        else:
            removed = await letters.purge(ids)
            emit(args, {"purged": removed}, f"purged: {removed}")
    return 0


async def events(args: argparse.Namespace) -> int:
    """One event a line (JSON lines with --json); a plain reader, not a node.

    With --since older than what Redis retains, the archive (persistence.storage filesystem
    or postgres) supplies the events before the oldest one in Redis.
    """
    from .archive import archived_events

    if getattr(args, "tokens", False):
        return await _events_with_tokens(args)
    since = args.since if args.since is not None else (None if args.follow else "0")
    after = after_id(since)
    types = set(args.type) if args.type else None
    transport, keys, _ = await _connect(args)
    shown = 0
    seen: set[str] = set()
    try:
        if args.since is not None:
            async for event in archived_events(config_from_args(args), transport, args.since,
                                               seen, types=types, agent_id=args.agent,
                                               session_id=args.session):
                print(msgspec.json.encode(event).decode() if args.json else
                      _event_line(event), flush=True)
                shown += 1
                if args.limit and shown >= args.limit:
                    return 0
        async for event in read_events(transport, keys.events(), after=after,
                                       follow=args.follow):
            if event.id in seen or not matches(event, types, args.agent, args.session):
                continue
            line = msgspec.json.encode(event).decode() if args.json else _event_line(event)
            print(line, flush=True)
            shown += 1
            if args.limit and shown >= args.limit:
                break
    finally:
        await transport.close()
    return 0


async def _events_with_tokens(args: argparse.Namespace) -> int:
    """``events --tokens --session S``: the session's events, each on its own line, with its
    streamed tokens printed inline between them (JSON lines with a "stream" field)."""
    from .archive import archived_events
    from .tokens import follow_session

    if not args.session:
        raise ConfigError("events --tokens needs --session (tokens are streamed per session)")
    since = args.since if args.since is not None else (None if args.follow else "0")
    after = after_id(since)
    types = set(args.type) if args.type else None
    transport, keys, _ = await _connect(args)
    shown = 0
    inline = False  # the last output was a token: no newline yet

    def show(stream: str, item: Any) -> bool:
        nonlocal shown, inline
        if args.json:
            print(json.dumps({"stream": stream, **msgspec.to_builtins(item)}), flush=True)
        elif stream == "tokens":
            print(item.text, end="", flush=True)
            inline = True
        else:
            print(("\n" if inline else "") + _event_line(item), flush=True)
            inline = False
        shown += 1
        return bool(args.limit and shown >= args.limit)

    seen: set[str] = set()
    try:
        if args.since is not None:
            async for event in archived_events(config_from_args(args), transport, args.since,
                                               seen, types=types, agent_id=args.agent,
                                               session_id=args.session):
                if show("events", event):
                    return 0
        async with follow_session(transport, keys.events(), keys.tokens(args.session),
                                  args.session, events_after=after, tokens_after=after,
                                  follow=args.follow) as items:
            async for stream, item in items:
                if isinstance(item, AgentEvent):  # stream == "events"
                    if item.id in seen or not matches(item, types, args.agent, args.session):
                        continue
                elif args.agent and item.agent_id != args.agent:  # a token
                    continue
                if show(stream, item):
                    break
    finally:
        if inline:
            print(flush=True)
        await transport.close()
    return 0


def _event_line(event: AgentEvent) -> str:
    moment = datetime.fromtimestamp(event.created_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
    data = " ".join(f"{k}={v}" for k, v in event.data.items())
    return (f"{moment} {event.type:<17} {event.agent_id or '-':<12} "
            f"session={event.session_id or '-'} message={event.message_id or '-'} {data}"
            ).rstrip()


async def archive(args: argparse.Namespace) -> int:
    """A standalone archiver: a node serving no agents, only the archiver group."""
    from .archive import archives

    config = config_from_args(args)
    if not archives(config.persistence):
        raise ConfigError(f"persistence.storage is {config.persistence.storage!r}"
                          f"{'' if config.persistence.enabled else ' (disabled)'}: nothing to "
                          "archive; set persistence.storage to filesystem or postgres")
    await run_node(config, [], archive=True)
    return 0


async def replay(args: argparse.Namespace) -> int:
    """Re-send a session's recorded messages, marked with kiki-replay."""
    from .archive import replay_session, session_messages

    async with MultiAgentCoordinator(config_from_args(args)) as coordinator:
        records = await session_messages(coordinator.config, coordinator.transport,
                                         args.session)
        done = await replay_session(coordinator, records, to=args.to, dry_run=args.dry_run)
    rows = [(r.original_id, r.message_id or "(dry run)", r.via, r.target, r.sender)
            for r in done]
    emit(args, msgspec.to_builtins(done),
         table(["ORIGINAL", "REPLAY", "VIA", "TARGET", "SENDER"], rows)
         + f"\n{len(done)} of {len(records)} recorded messages of session {args.session} "
         + ("would be re-sent" if args.dry_run else "re-sent"))
    return 0


async def serve(args: argparse.Namespace) -> int:
    """The SSE app: sessions' events and tokens over HTTP (needs the serve extra)."""
    try:
        from .sse import run_server
    except ImportError as exc:
        raise ConfigError("coordinator serve needs the serve extra: pip install "
                          f"'kiki-coordinator[serve]' ({exc})") from None
    await run_server(config_from_args(args), args.host, args.port)
    return 0


async def config(args: argparse.Namespace) -> int:
    from .configfile import load_config

    effective = load_config(args.file).describe()
    emit(args, effective, f"{args.file}: OK\n" + json.dumps(effective, indent=2, default=str))
    return 0
