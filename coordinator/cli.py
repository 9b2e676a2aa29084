"""The ``coordinator`` command: parse arguments, build the config, run. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from .config import CoordinatorConfig
from .configfile import load_config
from .errors import CoordinatorError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EPILOG = "Every command takes --redis-url (or KIKI_REDIS_URL) and --prefix; see `coordinator COMMAND --help`."


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument("--redis-url", help="Redis URL (default: KIKI_REDIS_URL or "
                        "redis://127.0.0.1:6379/0)")
    parser.add_argument("--config", metavar="FILE", help="eventbus.yaml configuration file")
    parser.add_argument("--prefix", help="key prefix (default: kiki)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by tests to check compose.yaml commands)."""
    parser = argparse.ArgumentParser(
        prog="coordinator", epilog=EPILOG,
        description="Reliable multi-agent coordination over Redis Streams consumer groups.")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        metavar="LEVEL", help="debug, info, warning or error (default info)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one object per line with agent/node/message/trace ids")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser("node", help="run an agent node process",
                          description="Serve agents until SIGTERM/SIGINT (graceful stop).")
    node.add_argument("--agent", action="append", required=True, metavar="MODULE:ATTR[=ID]",
                      help="agent object, async handler or factory to serve (repeatable)")
    node.add_argument("--node-id", help="unique node id (default hostname-pid-random)")
    node.add_argument("--concurrency", type=int, help="handler slots per agent (default 64)")
    node.add_argument("--heartbeat-ttl-ms", type=int, help="node is dead after this (5000)")
    node.add_argument("--claim-idle-ms", type=int, help="idle claim backstop (30000)")
    node.add_argument("--max-deliveries", type=int, help="before dead-lettering (5)")
    node.add_argument("--grace-ms", type=int, help="on SIGTERM, in-flight handlers may run "
                      "this long before their entries are handed back (10000)")
    node.add_argument("--metrics-port", type=int, metavar="PORT",
                      help="serve Prometheus metrics on this port (needs the otel extra)")
    node.add_argument("--otlp-endpoint", metavar="URL", help="export traces and metrics over "
                      "OTLP/HTTP, e.g. http://collector:4318 (needs the otel extra)")
    node.add_argument("--no-archive", dest="archive", action="store_false",
                      help="do not join the archiver group even when persistence.storage is "
                      "filesystem or postgres (run `coordinator archive` elsewhere)")
    _common(node, json_flag=False)

    demo = sub.add_parser("demo", help="run the multi-agent demo on an embedded Redis",
                          description="Start a private redis-server (unless --redis-url), "
                          "three node processes, send work, kill a node mid-way, show the "
                          "failover and a summary, clean up.")
    demo.add_argument("--messages", type=int, default=2000, help="work messages (2000)")
    _common(demo, json_flag=False)

    status = sub.add_parser("status", help="streams, groups, backlog, pending, nodes")
    _common(status)
    agents = sub.add_parser("agents", help="live agents and where they run")
    _common(agents)

    send = sub.add_parser("send", help="send a JSON payload to an agent")
    send.add_argument("agent", help="target agent id")
    send.add_argument("payload", help="JSON payload, e.g. '{\"text\": \"hi\"}'")
    send.add_argument("--wait", action="store_true", help="send as a request, print the reply")
    send.add_argument("--timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                      help="with --wait: give up after this long (30)")
    send.add_argument("--session", help="session id")
    _common(send)

    dlq = sub.add_parser("dlq", help="dead letters of an agent: list, show, redrive, purge")
    dlq.add_argument("action", choices=["list", "show", "redrive", "purge"])
    dlq.add_argument("agent", help="agent id")
    dlq.add_argument("ids", nargs="*", help="dead-letter ids (show: one; redrive/purge: "
                     "some, or all when none given)")
    dlq.add_argument("--all", action="store_true", help="confirm redrive/purge of all")
    dlq.add_argument("--topic", help="the agent's subscription to this topic, not its inbox "
                     "(a redrive reaches this subscriber only)")
    _common(dlq)
    events = sub.add_parser("events", help="lifecycle events: replay, follow, filter",
                            description="Print lifecycle events (agent:started, "
                            "agent:completed, agent:failed, agent:message, ...), oldest first.")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--session", help="only events of this session")
    events.add_argument("--type", action="append", metavar="T",
                        help="only events of this type (repeatable)")
    events.add_argument("--agent", help="only events of this agent")
    events.add_argument("--since", metavar="ID|TIME", help="after this stream id, or from this "
                        "epoch-ms or ISO time (default: all retained; with --follow: new only)")
    events.add_argument("--limit", type=int, help="stop after this many events")
    events.add_argument("--tokens", action="store_true", help="with --session: interleave the "
                        "session's streamed model tokens (printed inline; with --json one "
                        "object a line with \"stream\": \"events\" or \"tokens\")")
    _common(events)
    archive = sub.add_parser("archive", help="run an archiver of lifecycle events",
                             description="Consume the events stream as the durable group "
                             "'archiver' and write every event to persistence.storage "
                             "(filesystem or postgres) until SIGTERM/SIGINT; catches up on "
                             "what was missed.")
    archive.add_argument("--node-id", help="unique node id (default hostname-pid-random)")
    _common(archive, json_flag=False)
    replay = sub.add_parser("replay", help="re-send a session's recorded messages",
                            description="Re-send the multiagent:sync messages recorded for a "
                            "session (from the archive, else from the events retained in "
                            "Redis), in order, with the header kiki-replay: <original id>.")
    replay.add_argument("--session", required=True, help="session id")
    replay.add_argument("--to", metavar="AGENT", help="only the messages sent to this agent")
    replay.add_argument("--dry-run", action="store_true", help="list, do not send")
    _common(replay)
    serve = sub.add_parser("serve", help="serve sessions' events and tokens as SSE",
                           description="Run the HTTP app (needs the serve extra): "
                           "GET /sessions/{session_id}/events[?tokens=1] streams a session's "
                           "lifecycle events (and tokens) as Server-Sent Events, resumable with "
                           "Last-Event-ID; GET /healthz.")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="listen port (8080)")
    _common(serve, json_flag=False)
    config = sub.add_parser("config", help="validate a configuration file",
                            description="Check an eventbus.yaml and print the effective "
                            "configuration (file, then KIKI_* variables), secrets masked.")
    config.add_argument("action", choices=["check"])
    config.add_argument("file", help="path of the YAML file")
    config.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """CLI flags over ``KIKI_*`` environment over the --config file over defaults."""
    overrides = {name: getattr(args, name, None) for name in (
        "redis_url", "prefix", "node_id", "concurrency", "heartbeat_ttl_ms", "claim_idle_ms",
        "max_deliveries", "grace_ms")}
    return load_config(getattr(args, "config", None), overrides=overrides)


def _configure_logging(level: str, log_format: str = "text") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_format == "json":
        from .logging_json import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _report(command: str, exc: BaseException) -> int:
    """Print one line for a failed command and return its exit code.

    Exceptions from task groups arrive wrapped in exception groups; they are unwrapped so a
    configuration error reads the same wherever it was raised.
    """
    leaves = _leaves(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130
    for leaf in leaves:
        if isinstance(leaf, SystemExit):
            raise leaf
    more = f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""
    if all(isinstance(leaf, CoordinatorError) for leaf in leaves):
        print(f"coordinator {command}: error: {_one_line(leaves[0])}{more}", file=sys.stderr)
        return 2
    first = next(leaf for leaf in leaves if not isinstance(leaf, CoordinatorError))
    logging.getLogger("coordinator").debug("fatal error", exc_info=exc)
    print(f"coordinator {command}: fatal: {type(first).__name__}: {_one_line(first)}{more}",
          file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level, args.log_format)
    try:
        from . import commands  # after parsing, so --help stays fast and import errors are ours

        run: Callable[[argparse.Namespace], Awaitable[int]] = getattr(commands, args.command)
        return anyio.run(run, args)
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
        # one line; the traceback only with --log-level DEBUG
        return _report(args.command, exc)


def emit(args: argparse.Namespace, data: Any, table: str) -> None:
    """Print JSON with --json, else the human table."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(table)


