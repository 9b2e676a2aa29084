"""OpenTelemetry: PRODUCER and CONSUMER spans of one trace across coordinators and node
processes, retries linked, dead letters marked, metrics in-process and over Prometheus, JSON
logs, and the cost of tracing on the hot path."""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from coordinator.agent import Message  # noqa: E402
from coordinator.config import CoordinatorConfig, DeliveryConfig  # noqa: E402
from coordinator.coordinator import MultiAgentCoordinator  # noqa: E402
from coordinator.logging_json import JsonFormatter  # noqa: E402
from coordinator.prometheus import render  # noqa: E402
from coordinator.signals import Reject  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AGENTS = "tests.processes.node_agents"
SPAN_KIND = trace.SpanKind


class Otel:
    """An SDK tracer and meter provider with in-memory exporters (never installed globally)."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        return [p for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == metric for p in m.data.data_points]

    def total(self, metric: str, **attrs: str) -> float:
        return sum(p.value if hasattr(p, "value") else p.count for p in self.points(metric)
                   if all(p.attributes.get(k) == v for k, v in attrs.items()))


@pytest.fixture
def otel() -> Iterator[Otel]:
    found = Otel()
    yield found
    found.tracer_provider.shutdown()
    found.meter_provider.shutdown()


def _config(url: str, prefix: str, node_id: str, **delivery: int) -> CoordinatorConfig:
    return CoordinatorConfig.from_url(url, prefix=prefix, node_id=node_id, delivery=DeliveryConfig(
        heartbeat_ttl_ms=1000, block_ms=100, grace_ms=1000, backoff_base_ms=20,
        backoff_max_ms=50, **delivery))


@pytest.fixture
async def pair(real_server: Any, prefix: str, otel: Otel
               ) -> AsyncIterator[tuple[MultiAgentCoordinator, MultiAgentCoordinator]]:
    """Coordinator ``a`` (the sender) and ``b`` (serves agents), sharing the exporters."""
    a = MultiAgentCoordinator(_config(real_server.url, prefix, "node-a", max_deliveries=3),
                              tracer_provider=otel.tracer_provider,
                              meter_provider=otel.meter_provider)
    b = MultiAgentCoordinator(_config(real_server.url, prefix, "node-b", max_deliveries=3),
                              tracer_provider=otel.tracer_provider,
                              meter_provider=otel.meter_provider)
    async with a, b:
        yield a, b


async def _until(check: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.real_redis
async def test_producer_and_consumer_spans_form_one_trace(
        pair: tuple[MultiAgentCoordinator, MultiAgentCoordinator], otel: Otel) -> None:
    a, b = pair
    inner = otel.tracer_provider.get_tracer("agent-code")
    handled = anyio.Event()

    async def echo(message: Message) -> str:
        with inner.start_as_current_span("graph run"):  # e.g. a LangGraph run
            pass
        handled.set()
        return "ok"

    b.register("echo", echo)
    message_id = await a.send("echo", {"text": "secret"}, session_id="s-1")
    with anyio.fail_after(10):
        await handled.wait()
    await _until(lambda: otel.finished("process echo"))

    [producer] = otel.finished("send echo")
    [consumer] = otel.finished("process echo")
    [child] = otel.finished("graph run")
    assert producer.kind == SPAN_KIND.PRODUCER and consumer.kind == SPAN_KIND.CONSUMER
    assert consumer.context.trace_id == producer.context.trace_id == child.context.trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert child.parent is not None and child.parent.span_id == consumer.context.span_id
    assert producer.attributes["messaging.system"] == "redis"
    assert producer.attributes["messaging.message.id"] == message_id
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["kiki.node_id"] == "node-a"
    attrs = consumer.attributes
    assert attrs["messaging.system"] == "redis"
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.destination.name"] == "echo"
    assert attrs["messaging.consumer.group.name"] == "echo"
    assert attrs["messaging.message.id"] == message_id
    assert attrs["messaging.redis.delivery_count"] == 1
    assert attrs["kiki.agent_id"] == "echo" and attrs["kiki.node_id"] == "node-b"
    assert attrs["kiki.session_id"] == "s-1"
    assert not consumer.links


@pytest.mark.anyio
@pytest.mark.real_redis
async def test_an_unsampled_trace_is_followed_without_recording(
        real_server: Any, prefix: str, otel: Otel) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    # The sender samples nothing; the handling node records only what a parent asks for.
    quiet = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    sender = MultiAgentCoordinator(_config(real_server.url, prefix, "node-a"),
                                   tracer_provider=quiet)
    node = MultiAgentCoordinator(_config(real_server.url, prefix, "node-b"),
                                 tracer_provider=otel.tracer_provider)
    inner = otel.tracer_provider.get_tracer("agent-code")
    seen: dict[str, Any] = {}

    async def first(message: Message, context: Any) -> None:
        with inner.start_as_current_span("graph run") as span:
            seen["graph"] = span.get_span_context()
        await context.send("second", "next")

    async def second(message: Message) -> None:
        seen["second"] = message.envelope.traceparent

    async with sender, node:
        node.register("first", first)
        node.register("second", second)
        await sender.send("first", "go")
        await _until(lambda: "second" in seen)
    traceparent = seen["second"]
    graph = seen["graph"]
    assert not graph.trace_flags.sampled and graph.is_valid
    assert traceparent.split("-")[1] == f"{graph.trace_id:032x}"  # still one trace
    assert int(traceparent.split("-")[3], 16) & 1 == 0  # and still not sampled downstream
    assert otel.finished() == []  # nothing recorded on the way


@pytest.mark.anyio
@pytest.mark.real_redis
async def test_request_chain_and_broadcast_stay_in_the_trace(
        pair: tuple[MultiAgentCoordinator, MultiAgentCoordinator], otel: Otel) -> None:
    a, b = pair
    got = anyio.Event()

    async def upper(message: Message) -> str:
        return str(message.payload).upper()

    async def front(message: Message, context: Any) -> str:
        answer = await context.request("upper", message.payload, timeout=5)
        await context.broadcast("news", answer)
        return str(answer)

    async def listener(message: Message) -> None:
        got.set()

    b.register("upper", upper)
    b.register("front", front)
    b.subscribe("news", listener)
    assert await a.request("front", "hi", timeout=10) == "HI"
    with anyio.fail_after(10):
        await got.wait()
    # "process front" ends after its reply was sent, so maybe after the request returned.
    await _until(lambda: otel.finished("process news") and otel.finished("process front"))
    spans = otel.finished()
    assert len({s.context.trace_id for s in spans}) == 1
    by_name = {s.name: s for s in spans}
    assert set(by_name) >= {"send front", "process front", "send upper", "process upper",
                            "publish news", "process news"}
    assert by_name["send upper"].parent.span_id == by_name["process front"].context.span_id
    assert by_name["publish news"].kind == SPAN_KIND.PRODUCER
    assert by_name["process news"].parent.span_id == by_name["publish news"].context.span_id
    assert by_name["process upper"].attributes["messaging.message.conversation_id"]


@pytest.mark.anyio
@pytest.mark.real_redis
async def test_retries_are_linked_and_dead_letters_marked(
        pair: tuple[MultiAgentCoordinator, MultiAgentCoordinator], otel: Otel) -> None:
    a, b = pair
    calls: dict[str, int] = {}

    async def flaky(message: Message) -> None:
        calls[message.payload] = calls.get(message.payload, 0) + 1
        if message.payload == "reject":
            raise Reject("not for me")
        if message.payload == "twice" and message.deliveries < 3:
            raise ValueError("not yet")
        if message.payload == "never":
            raise ValueError("never works")

    b.register("flaky", flaky)
    await a.send("flaky", "twice")
    await a.send("flaky", "never")
    await a.send("flaky", "reject")
    await _until(lambda: len(otel.finished("process flaky")) >= 7)
    await anyio.sleep(0.2)
    spans = otel.finished("process flaky")
    producers = {s.attributes["messaging.message.id"]: s for s in otel.finished("send flaky")}
    by_message: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_message.setdefault(str(span.attributes["messaging.message.id"]), []).append(span)
    for message_id, runs in by_message.items():
        runs.sort(key=lambda s: s.attributes["messaging.redis.delivery_count"])
        producer = producers[message_id]
        assert all(r.parent.span_id == producer.context.span_id for r in runs)
        assert [r.attributes["messaging.redis.delivery_count"] for r in runs] == list(
            range(1, len(runs) + 1))
        assert not runs[0].links
        for previous, run in zip(runs, runs[1:]):
            linked = {link.context.span_id: dict(link.attributes) for link in run.links}
            assert linked[producer.context.span_id] == {
                "kiki.link": "producer",
                "kiki.attempt": run.attributes["messaging.redis.delivery_count"]}
            assert linked[previous.context.span_id] == {
                "kiki.link": "previous_attempt",
                "kiki.attempt": previous.attributes["messaging.redis.delivery_count"]}
        dead = [e for r in runs for e in r.events if e.name == "dead_lettered"]
        if dead:  # only ever on the last attempt
            assert dead[0] in runs[-1].events
    lengths = sorted((len(r), sum(e.name == "dead_lettered" for s in r for e in s.events))
                     for r in by_message.values())
    assert lengths == [(1, 1), (3, 0), (3, 1)]  # reject, twice (then ok), never

    await _until(lambda: otel.total("kiki.messages.dead_lettered") == 2)
    assert otel.total("kiki.messages.retried") == 4
    assert otel.total("kiki.messages.sent", **{"messaging.destination.name": "flaky"}) == 3
    assert otel.total("kiki.messages.acked") == 1


@pytest.mark.anyio
@pytest.mark.real_redis
async def test_metrics_have_sane_values(real_server: Any, prefix: str, otel: Otel) -> None:
    config = _config(real_server.url, prefix, "node-m")
    release = anyio.Event()

    async def slow(message: Message) -> None:
        if message.payload == "hold":
            await release.wait()

    async with MultiAgentCoordinator(config, tracer_provider=otel.tracer_provider,
                                     meter_provider=otel.meter_provider) as node:
        node.register("slow", slow)
        for i in range(20):
            await node.send("slow", i)
        await _until(lambda: otel.total("kiki.messages.acked") == 20)
        await node.send("slow", "hold")
        await _until(lambda: otel.total("kiki.messages.delivered") == 21)
        await anyio.sleep(0.3)
        await node.telemetry.sample(node.transport)  # what the interval task does
        assert otel.total("kiki.inbox.pending") == 1
        assert otel.total("kiki.inbox.backlog") == 1
        [age] = [p.value for p in otel.points("kiki.inbox.oldest_pending_age")]
        assert 0.2 <= age < 10
        release.set()
        await _until(lambda: otel.total("kiki.messages.acked") == 21)
        assert otel.total("kiki.messages.sent") == 21
        assert otel.total("kiki.handler.duration") == 21  # count of the histogram
        [duration] = [p for p in otel.points("kiki.handler.duration")]
        assert 0.2 <= duration.max < 10 and duration.min >= 0
        [latency] = otel.points("kiki.message.end_to_end_latency")
        assert latency.count == 21 and 0 <= latency.min and latency.max < 5
        assert otel.total("kiki.node.heartbeats") >= 1
        assert otel.total("kiki.messages.retried") == 0
        assert otel.total("kiki.lease.losses") == 0
        text = render(otel.metrics.get_metrics_data())
    assert "# TYPE kiki_messages_acked_total counter" in text
    assert "# TYPE kiki_handler_duration_seconds histogram" in text
    assert 'kiki_handler_duration_seconds_bucket{' in text and 'le="+Inf"' in text
    assert "# TYPE kiki_inbox_pending gauge" in text


@pytest.mark.anyio
async def test_without_providers_nothing_is_recorded_or_installed(prefix: str) -> None:
    from coordinator.transport import MemoryTransport

    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
    got: list[Message] = []

    async def echo(message: Message) -> None:
        got.append(message)

    config = CoordinatorConfig.from_url("redis://unused", prefix=prefix, node_id="quiet")
    async with MultiAgentCoordinator(config, transport=MemoryTransport()) as node:
        node.register("echo", echo)
        await node.send("echo", 1)
        await _until(lambda: bool(got))
    assert got[0].envelope.traceparent is None  # no-op spans carry no context
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"


def test_json_log_records_carry_ids_and_trace(otel: Otel) -> None:
    record = logging.LogRecord("coordinator.x", logging.WARNING, __file__, 1,
                               "handler failed: %s", ("boom",), None)
    record.message_id = "m-1"
    record.agent_id = "echo"
    tracer = otel.tracer_provider.get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["message"] == "handler failed: boom" and data["level"] == "WARNING"
    assert data["message_id"] == "m-1" and data["agent_id"] == "echo"
    assert data["trace_id"] == f"{span.get_span_context().trace_id:032x}"


# -- real node processes --------------------------------------------------------------------
class OtlpReceiver:
    """A minimal OTLP/HTTP receiver on loopback: keeps every span the nodes export."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        spans: list[dict[str, Any]] = []
        self.spans = spans
        self.metric_posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    for resource_spans in request.resource_spans:
                        service = {a.key: a.value.string_value
                                   for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                spans.append({
                                    "name": span.name, "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    "instance": service.get("service.instance.id"),
                                    "attributes": {a.key: a.value for a in span.attributes}})
                else:
                    receiver.metric_posts += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NodeProcs:
    """``python -m coordinator node`` processes (cwd: the repository root)."""

    def __init__(self, url: str, prefix: str, logs: Path) -> None:
        self.url, self.prefix, self.logs = url, prefix, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, node_id: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "coordinator", "--log-format", "json", "node",
               "--redis-url", self.url, "--prefix", self.prefix, "--node-id", node_id,
               "--heartbeat-ttl-ms", "1000", "--grace-ms", "1000", *args]
        with open(self.logs / f"{node_id}.log", "wb") as log:
            self.procs.append(subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}))

    def log(self, node_id: str) -> str:
        return (self.logs / f"{node_id}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(real_server: Any, prefix: str, tmp_path: Path) -> Iterator[NodeProcs]:
    found = NodeProcs(real_server.url, prefix, tmp_path)
    try:
        yield found
    finally:
        found.stop()


async def _wait_for_agents(node: MultiAgentCoordinator, *agents: str) -> None:
    async def hosted() -> set[str]:
        return {a for n in await node.nodes() for a in n.agents}

    with anyio.fail_after(30):
        while not set(agents) <= await hosted():
            await anyio.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.real_redis
@pytest.mark.slow
async def test_one_trace_across_node_processes(real_server: Any, prefix: str, otel: Otel,
                                               procs: NodeProcs) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    receiver = OtlpReceiver()
    try:
        procs.start("node-1", "--agent", f"{AGENTS}:recorder=first",
                    "--otlp-endpoint", receiver.url)
        procs.start("node-2", "--agent", f"{AGENTS}:recorder=second",
                    "--otlp-endpoint", receiver.url)
        async with MultiAgentCoordinator(_config(real_server.url, prefix, "driver"),
                                         tracer_provider=otel.tracer_provider) as driver:
            await _wait_for_agents(driver, "first", "second")
            # driver -> first (node-1) -> second (node-2): three hops, one conversation
            message_id = await driver.send("first", {"n": 1, "report_to": "second"},
                                           session_id="conv-1")
            # Each node exports on its own schedule: wait for the spans of both.
            expected = {"process first", "send second", "process second"}
            with anyio.move_on_after(20):
                while not expected <= {s["name"] for s in receiver.spans}:
                    await anyio.sleep(0.1)
        [root] = otel.finished("send first")
        trace_id = f"{root.context.trace_id:032x}"
        spans = {s["name"]: s for s in receiver.spans if s["trace_id"] == trace_id}
        assert set(spans) >= {"process first", "send second", "process second"}, (
            receiver.spans, procs.log("node-1"))
        assert spans["process first"]["instance"] == "node-1"
        assert spans["process second"]["instance"] == "node-2"
        assert spans["process first"]["parent"] == f"{root.context.span_id:016x}"
        assert spans["send second"]["parent"] == spans["process first"]["span_id"]
        assert spans["process second"]["parent"] == spans["send second"]["span_id"]
        attrs = spans["process first"]["attributes"]
        assert attrs["messaging.message.id"].string_value == message_id
        assert attrs["kiki.session_id"].string_value == "conv-1"
        assert spans["process second"]["attributes"]["kiki.session_id"].string_value == "conv-1"
    finally:
        procs.stop()
        receiver.close()
    log_lines = [json.loads(line) for line in procs.log("node-1").splitlines()
                 if line.startswith("{")]
    assert any(line.get("node_id") == "node-1" for line in log_lines)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.partition("{")[0]
            if 'le="' not in series:
                values[name] = values.get(name, 0.0) + float(value)
    return values


@pytest.mark.anyio
@pytest.mark.real_redis
@pytest.mark.slow
async def test_prometheus_endpoint_of_a_running_node(real_server: Any, prefix: str,
                                                     procs: NodeProcs) -> None:
    port = _free_port()
    procs.start("node-p", "--agent", f"{AGENTS}:recorder", "--agent", f"{AGENTS}:failing",
                "--max-deliveries", "2", "--metrics-port", str(port))
    async with MultiAgentCoordinator(_config(real_server.url, prefix, "driver")) as driver:
        await _wait_for_agents(driver, "recorder", "failing")
        for i in range(50):
            await driver.send("recorder", {"n": i, "text": "payload-content-marker"})
        await driver.send("failing", {"n": -1})
        with anyio.fail_after(30):
            while True:
                values = await anyio.to_thread.run_sync(_scrape, port)
                if (values.get("kiki_messages_acked_total") == 50
                        and values.get("kiki_messages_dead_lettered_total") == 1
                        # gauges are sampled on an interval: wait for a sample after the work
                        and values.get("kiki_inbox_backlog") == 0):
                    break
                await anyio.sleep(0.2)
    assert values["kiki_messages_delivered_total"] == 52  # 50 + the failing one twice
    assert values["kiki_messages_retried_total"] == 1
    assert values["kiki_handler_duration_seconds_count"] == 52
    assert 0 < values["kiki_handler_duration_seconds_sum"] < 10
    assert values["kiki_message_end_to_end_latency_seconds_count"] == 52
    assert values["kiki_node_heartbeats_total"] >= 1
    assert values["kiki_lease_losses_total"] == 0
    assert values["kiki_inbox_backlog"] == 0 and values["kiki_inbox_pending"] == 0
    assert "kiki_messages_sent_total" not in values or values["kiki_messages_sent_total"] == 0
    procs.stop()
    assert "payload-content-marker" not in procs.log("node-p")


def test_exporters_without_the_sdk_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.errors import ConfigError
    from coordinator.telemetry_export import NodeExporters

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.metrics", None)
    with pytest.raises(ConfigError, match="otel"):
        NodeExporters(node_id="n", metrics_port=0)


def test_node_exporters_serve_prometheus_and_flush() -> None:
    from coordinator.telemetry import Telemetry
    from coordinator.telemetry_export import NodeExporters

    exporters = NodeExporters(node_id="n-1", metrics_port=0, metrics_host="127.0.0.1")
    try:
        assert exporters.metrics_server is not None and exporters.tracer_provider is None
        Telemetry(meter_provider=exporters.meter_provider, node_id="n-1")
        values = _scrape(exporters.metrics_server.port)
        assert values["kiki_node_heartbeats_total"] == 0
    finally:
        exporters.close()


def test_trace_context_is_read_back_from_the_envelope(otel: Otel) -> None:
    from coordinator.producer import make_envelope
    from coordinator.telemetry import Telemetry

    telemetry = Telemetry(otel.tracer_provider, node_id="n")
    tracer = otel.tracer_provider.get_tracer("t")
    with tracer.start_as_current_span("outer") as outer:
        fields = telemetry.trace_fields()
    envelope = make_envelope("a", 1, traceparent=fields["traceparent"], tracestate="k=v")
    parent = trace.get_current_span(telemetry._parent_of(envelope)[0]).get_span_context()
    assert parent.span_id == outer.get_span_context().span_id and parent.is_remote
    assert parent.trace_state.get("k") == "v"
    for bad in ("garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "00-zz-yy-01"):
        envelope = make_envelope("a", 1, traceparent=bad)
        assert not trace.get_current_span(
            telemetry._parent_of(envelope)[0]).get_span_context().is_valid


def test_messages_sent_together_and_apart_keep_their_own_parents(otel: Otel) -> None:
    from coordinator.producer import make_envelope
    from coordinator.telemetry import Telemetry

    telemetry = Telemetry(otel.tracer_provider, node_id="n")
    tracer = otel.tracer_provider.get_tracer("t")
    senders = []
    for name in ("first", "second"):
        with tracer.start_as_current_span(name) as span:
            senders.append((span.get_span_context().span_id, telemetry.trace_fields()))
    # A batch from one sender, then the other, then the first again (the parsed context of
    # the latest sender is reused; it must never leak onto another sender's message).
    for span_id, fields in [senders[0], senders[0], senders[1], senders[0]]:
        envelope = make_envelope("a", 1, **fields)
        parent = trace.get_current_span(telemetry._parent_of(envelope)[0]).get_span_context()
        assert parent.span_id == span_id
    stated = make_envelope("a", 1, traceparent=senders[0][1]["traceparent"], tracestate="k=v")
    parent = trace.get_current_span(telemetry._parent_of(stated)[0]).get_span_context()
    assert parent.trace_state.get("k") == "v"


def test_histograms_take_every_message_at_low_rates_and_a_sample_at_high_ones() -> None:
    import time as clock

    from coordinator.telemetry_processing import Thinning

    slow = Thinning(per_second=1_000)
    picked = 0
    for _ in range(20):  # ~200 a second
        picked += slow.take()
        clock.sleep(0.005)
    assert picked == 20
    fast = Thinning(per_second=1_000)
    started = clock.monotonic()
    picked = sum(fast.take() for _ in range(200_000))  # millions a second
    elapsed = clock.monotonic() - started
    assert 0 < picked <= 1_000 * (elapsed + 0.2) + 200  # about the budget, never all


def test_active_follows_a_provider_installed_later_within_a_second(
        otel: Otel, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import telemetry as telemetry_module
    from coordinator.telemetry import Telemetry

    clock = [1000.0]
    monkeypatch.setattr(telemetry_module.time, "monotonic", lambda: clock[0])
    quiet = Telemetry(node_id="n")
    assert not quiet.active and not quiet.tracing
    monkeypatch.setattr(telemetry_module.otel_trace, "get_tracer_provider",
                        lambda: otel.tracer_provider)  # as trace.set_tracer_provider would
    clock[0] += 0.5
    assert not quiet.active  # the global providers are looked up once a second at most
    clock[0] += 0.6
    assert quiet.active and quiet.tracing
    assert Telemetry(otel.tracer_provider, node_id="n").active
    assert Telemetry(meter_provider=otel.meter_provider, node_id="n").active
