"""OpenTelemetry for the coordinator: spans around sends and handlers, and metrics. With
``telemetry_processing`` (the CONSUMER span of a handler run) and ``telemetry_export`` (the
SDK exporters of a node process), the only modules that import opentelemetry.

The library uses the tracer and meter providers it is given, else the API's global ones (no-ops
unless the application installs an SDK); it never installs global providers itself. Without
``opentelemetry-api`` installed every call here is a cheap no-op.

Trace context travels in the envelope (W3C ``traceparent``/``tracestate``): a send opens a
PRODUCER span and writes its context into the envelope; handling opens a CONSUMER span whose
parent is that context, so a conversation hopping across nodes is one trace. Attributes follow
the OpenTelemetry messaging semantic conventions.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

import anyio

from .delivery import Delivery
from .envelope import Envelope
from .errors import TransportError
from .registry import now_ms
from .telemetry_processing import HISTOGRAM_MEASUREMENTS_PER_S, Processing, Thinning

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    HAVE_OTEL = True
except ImportError:  # pragma: no cover - the API is optional
    HAVE_OTEL = False

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.metrics import MeterProvider as MeterProvider
    from opentelemetry.trace import Span
    from opentelemetry.trace import TracerProvider as TracerProvider

    from .consumer import GroupConsumer
    from .transport import StreamTransport
else:  # importable for annotations elsewhere, whether or not opentelemetry is installed
    MeterProvider = TracerProvider = object

log = logging.getLogger(__name__)

SCOPE = "kiki.coordinator"
VERSION = "0.1.0"
#: Seconds; the API's default buckets are meant for milliseconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0)
#: ConsumerStats counter -> exported metric name.
STATS_METRICS = {
    "delivered": "kiki.messages.delivered", "acked": "kiki.messages.acked",
    "retried": "kiki.messages.retried", "dead_lettered": "kiki.messages.dead_lettered",
    "duplicates": "kiki.messages.duplicates_suppressed", "reclaimed": "kiki.messages.reclaimed",
    "leases_renewed": "kiki.lease.renewals", "leases_lost": "kiki.lease.losses",
}
_REMEMBERED_ATTEMPTS = 10_000


class Watched(Protocol):
    """What the metrics read from a coordinator (its consumers and node counters)."""

    @property
    def consumers(self) -> Sequence[GroupConsumer]: ...


def destination_of(stream: str) -> str:
    """The agent id or topic of a stream key (``prefix:{a:NAME}:stream``)."""
    tag = stream.partition("{")[2].partition("}")[0]
    return tag.partition(":")[2] or stream


def trace_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, for log records (empty when none)."""
    if not HAVE_OTEL:
        return {}
    ctx = otel_trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


#: Provider types of the API alone (nothing installed): recording through them is a no-op.
_NO_OP_PROVIDERS = frozenset({"ProxyTracerProvider", "NoOpTracerProvider",
                              "_ProxyMeterProvider", "NoOpMeterProvider"})


class Telemetry:
    """Spans and metrics of one coordinator.

    :param tracer_provider: where spans go (default: the API's global provider)
    :param meter_provider: where metrics go (default: the API's global provider)
    :param sample_interval_s: how often backlog, pending and oldest pending age are read
    :param trust_parent_sampling: a message whose trace context says "not sampled" is
        handled under that context without a CONSUMER span of its own, as parent-based
        sampling (the SDK's default sampler) decides anyway; False asks the sampler for every
        message (for a sampler that may record children of unsampled parents)
    """

    def __init__(self, tracer_provider: TracerProvider | None = None,
                 meter_provider: MeterProvider | None = None, *, node_id: str,
                 sample_interval_s: float = 10.0, trust_parent_sampling: bool = True) -> None:
        self.node_id = node_id
        self.trust_parent_sampling = trust_parent_sampling
        self._sample_interval_s = sample_interval_s
        self._explicit_meter = meter_provider is not None
        self._source: Watched | None = None
        self._inboxes: dict[tuple[str, str], tuple[int, int, float | None]] = {}
        self._attrs: dict[tuple[str, ...], dict[str, str]] = {}
        self._sent: dict[tuple[str, str, str], int] = {}
        self._attempts: OrderedDict[str, object] = OrderedDict()
        self._last_parent: tuple[str, tuple[object, bool | None]] = ("", (None, None))
        self.enabled = HAVE_OTEL
        # What `active` answers, and until when (monotonic s) without a look at the global
        # providers: for good with the answer fixed (no API; a provider given).
        self._active = HAVE_OTEL and (tracer_provider is not None or self._explicit_meter)
        self._active_until = math.inf if self._active or not HAVE_OTEL else -math.inf
        if not HAVE_OTEL:
            return
        self._explicit_tracer = tracer_provider is not None
        self._tracing = self._explicit_tracer
        self._metering = self._explicit_meter
        self._active_checked_at = -1e9
        #: Picks the messages whose duration and latency go to the histograms.
        self.histogram_sample = Thinning(HISTOGRAM_MEASUREMENTS_PER_S)
        tracers = tracer_provider or otel_trace.get_tracer_provider()
        self._tracer = tracers.get_tracer(SCOPE, VERSION)
        self._propagator = TraceContextTextMapPropagator()
        meters = meter_provider or otel_metrics.get_meter_provider()
        # One meter per node: two coordinators in one process keep their own callbacks.
        meter = meters.get_meter(SCOPE, VERSION, attributes={"kiki.node_id": node_id})
        # Counted here and observed at collection: an SDK measurement costs ~10 us.
        meter.create_observable_counter("kiki.messages.sent", [self._sent_observations],
                                        "{message}", "Messages appended to inboxes and topics")
        self._duration = meter.create_histogram(
            "kiki.handler.duration", "s", "Time a handler ran",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._latency = meter.create_histogram(
            "kiki.message.end_to_end_latency", "s", "From envelope creation to handler start",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        for stat, name in STATS_METRICS.items():
            meter.create_observable_counter(name, [self._stat_callback(stat)], "{message}")
        meter.create_observable_counter("kiki.node.heartbeats", [self._heartbeats], "{beat}")
        meter.create_observable_counter("kiki.events.dropped", [self._events_dropped],
                                        "{event}")
        meter.create_observable_gauge("kiki.inbox.backlog", [self._gauge(0)], "{message}",
                                      "Entries not yet acknowledged by the group")
        meter.create_observable_gauge("kiki.inbox.pending", [self._gauge(1)], "{message}",
                                      "Entries delivered and not yet acknowledged")
        meter.create_observable_gauge("kiki.inbox.oldest_pending_age", [self._gauge(2)], "s",
                                      "Age of the oldest pending entry")

    @property
    def active(self) -> bool:
        """Whether anything would record spans or metrics. With only the API's default
        (no-op) providers, per-message telemetry is skipped entirely. The global providers
        are looked up at most once a second, so one installed after the coordinator was built
        takes effect within a second."""
        # Asked once per handled message: one clock read while the answer is fresh.
        if time.monotonic() >= self._active_until:
            self._check_providers()
        return self._active

    @property
    def tracing(self) -> bool:
        """Whether spans would be recorded (a tracer provider other than the no-op one)."""
        if not HAVE_OTEL:
            return False
        if self._explicit_tracer:
            return True
        self._check_providers()
        return self._tracing

    @property
    def metering(self) -> bool:
        """Whether measurements would be recorded (a meter provider other than the no-op one).
        Call after :attr:`active`, which refreshes what is known of the global providers."""
        return HAVE_OTEL and self._metering

    def _check_providers(self) -> None:
        now = time.monotonic()
        if now >= self._active_checked_at + 1.0:  # the provider lookups cost ~2 us: cache 1 s
            self._active_checked_at = now
            self._tracing = self._explicit_tracer or (
                type(otel_trace.get_tracer_provider()).__name__ not in _NO_OP_PROVIDERS)
            self._metering = self._explicit_meter or (
                type(otel_metrics.get_meter_provider()).__name__ not in _NO_OP_PROVIDERS)
            self._active = self._tracing or self._metering
            self._active_until = now + 1.0

    def watch(self, source: Watched) -> None:
        """Read consumer counters (and ``heartbeats``, ``event_publisher.dropped`` when the
        source has them) from ``source`` whenever metrics are collected."""
        self._source = source

    def _attributes(self, destination: str, group: str, outcome: str = "") -> dict[str, str]:
        """Attribute dicts of histogram points, built once: few keys, as the SDK hashes them
        on every measurement (the node id is an attribute of the meter)."""
        key = (destination, group, outcome)
        found = self._attrs.get(key)
        if found is None:
            found = {"messaging.destination.name": destination,
                     "messaging.consumer.group.name": group}
            if outcome:
                found["kiki.outcome"] = outcome
            if len(self._attrs) < 10_000:
                self._attrs[key] = found
        return found

    # -- producing --------------------------------------------------------------------------
    def producer(self, operation: str, destination: str, *, session_id: str | None = None,
                 sender: str | None = None) -> AbstractContextManager[Span | None]:
        """The PRODUCER span of one send (``send``) or broadcast (``publish``); current
        while the envelope is built, so :meth:`trace_fields` picks it up."""
        if not self.tracing:
            return nullcontext()
        attributes: dict[str, str] = {
            "messaging.system": "redis", "messaging.operation.type": "send",
            "messaging.operation.name": operation, "messaging.destination.name": destination,
            "kiki.node_id": self.node_id}
        if session_id:
            attributes["kiki.session_id"] = session_id
        if sender:
            attributes["kiki.agent_id"] = sender
        return _Current(self._tracer.start_span(f"{operation} {destination}",
                                                kind=otel_trace.SpanKind.PRODUCER,
                                                attributes=attributes))

    def trace_fields(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) of the current span, for an envelope."""
        if not HAVE_OTEL:
            return {}
        ctx = otel_trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return {}
        fields = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-"
                                 f"{int(ctx.trace_flags):02x}"}
        if ctx.trace_state:
            fields["tracestate"] = ctx.trace_state.to_header()
        return fields

    def sent(self, span: Span | None, envelopes: Sequence[Envelope], operation: str) -> None:
        """Count messages sent together (one target, one sender) and name them on their
        PRODUCER span: the message id of one, the count of a batch."""
        if not HAVE_OTEL or not envelopes:
            return
        first = envelopes[0]
        if span is not None and span.is_recording():
            if len(envelopes) > 1:
                span.set_attribute("messaging.batch.message_count", len(envelopes))
            else:
                span.set_attribute("messaging.message.id", first.id)
                if first.correlation_id:
                    span.set_attribute("messaging.message.conversation_id",
                                       first.correlation_id)
        key = (operation, first.target, first.sender or "")
        self._sent[key] = self._sent.get(key, 0) + len(envelopes)

    # -- consuming --------------------------------------------------------------------------
    def process(self, delivery: Delivery, agent_id: str, topic: str | None) -> Processing:
        """The CONSUMER span and timing of one handler run (a context manager)."""
        return Processing(self, delivery, agent_id, topic)

    def _parent_of(self, envelope: Envelope) -> tuple[object, bool | None]:
        """The sender's trace context of ``envelope`` and whether its trace is sampled
        (None without a valid one: the handler span is then a root span)."""
        traceparent = envelope.traceparent
        if not traceparent:
            return otel_context.Context(), None
        if traceparent == self._last_parent[0] and not envelope.tracestate:
            # Messages sent together (send_many, a broadcast) share their sender's context.
            return self._last_parent[1]
        found = self._parse_parent(envelope, traceparent)
        if not envelope.tracestate:
            self._last_parent = (traceparent, found)
        return found

    def _parse_parent(self, envelope: Envelope, traceparent: str
                      ) -> tuple[object, bool | None]:
        empty = otel_context.Context()
        parts = traceparent.split("-")
        if (len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32
                or len(parts[2]) != 16 or len(parts[3]) != 2):
            # Other versions and malformed values: the propagator's full rules.
            carrier = {"traceparent": traceparent}
            if envelope.tracestate:
                carrier["tracestate"] = envelope.tracestate
            extracted = self._propagator.extract(carrier, context=empty)
            found = otel_trace.get_current_span(extracted).get_span_context()
            return extracted, found.trace_flags.sampled if found.is_valid else None
        try:
            span_context = otel_trace.SpanContext(
                int(parts[1], 16), int(parts[2], 16), is_remote=True,
                trace_flags=otel_trace.TraceFlags(int(parts[3], 16)),
                trace_state=otel_trace.TraceState.from_header([envelope.tracestate])
                if envelope.tracestate else None)
        except ValueError:
            return empty, None
        if not span_context.is_valid:
            return empty, None
        return (otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(span_context), empty),
                span_context.trace_flags.sampled)

    def _remember_attempt(self, message_id: str, span_context: object) -> None:
        attempts = self._attempts
        attempts[message_id] = span_context
        if len(attempts) > _REMEMBERED_ATTEMPTS:
            attempts.popitem(last=False)

    # -- metrics read at collection time --------------------------------------------------
    def _consumers(self) -> Sequence[GroupConsumer]:
        return self._source.consumers if self._source is not None else ()

    def _consumer_attributes(self, consumer: GroupConsumer) -> dict[str, str]:
        spec = consumer.spec
        return {"messaging.system": "redis", "kiki.node_id": self.node_id,
                "messaging.destination.name": destination_of(spec.keys.stream),
                "messaging.consumer.group.name": spec.group}

    def _stat_callback(self, stat: str):  # type: ignore[no-untyped-def]
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for consumer in tuple(self._consumers()):
                yield otel_metrics.Observation(getattr(consumer.stats, stat),
                                               self._consumer_attributes(consumer))
        return observe

    def _sent_observations(self, options: CallbackOptions) -> Iterable[Observation]:
        for (operation, destination, sender), count in list(self._sent.items()):
            attributes = {"messaging.system": "redis", "messaging.operation.name": operation,
                          "messaging.destination.name": destination,
                          "kiki.node_id": self.node_id}
            if sender:
                attributes["kiki.agent_id"] = sender
            yield otel_metrics.Observation(count, attributes)

    def _node_counter(self, value: int) -> Iterator[Observation]:
        yield otel_metrics.Observation(value, {"kiki.node_id": self.node_id})

    def _heartbeats(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._node_counter(int(getattr(self._source, "heartbeats", 0)))

    def _events_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        publisher = getattr(self._source, "event_publisher", None)
        return self._node_counter(int(getattr(publisher, "dropped", 0)))

    def _gauge(self, index: int):  # type: ignore[no-untyped-def]
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for (stream, group), values in list(self._inboxes.items()):
                value = values[index]
                if value is not None:
                    yield otel_metrics.Observation(value, {
                        "messaging.system": "redis", "kiki.node_id": self.node_id,
                        "messaging.destination.name": destination_of(stream),
                        "messaging.consumer.group.name": group})
        return observe

    def _sampling_wanted(self) -> bool:
        if not HAVE_OTEL:
            return False
        if self._explicit_meter:
            return True
        provider = otel_metrics.get_meter_provider()
        # The API's defaults: nothing would read the samples.
        return type(provider).__name__ not in ("NoOpMeterProvider", "_ProxyMeterProvider")

    async def sample_forever(self, transport: StreamTransport) -> None:
        """Read backlog, pending and oldest pending age of every served stream each interval
        (not per message); gauges report the latest sample."""
        while True:
            if self._sampling_wanted():
                await self.sample(transport)
            await anyio.sleep(self._sample_interval_s)

    async def sample(self, transport: StreamTransport) -> None:
        """Take one sample now."""
        found: dict[tuple[str, str], tuple[int, int, float | None]] = {}
        for consumer in tuple(self._consumers()):
            stream, group = consumer.spec.keys.stream, consumer.spec.group
            try:
                found[(stream, group)] = await _inbox_sample(transport, stream, group)
            except TransportError as exc:
                log.debug("sampling %s failed: %s", stream, exc)
        self._inboxes = found


async def _inbox_sample(transport: StreamTransport, stream: str,
                        group: str) -> tuple[int, int, float | None]:
    info = next((g for g in await transport.groups(stream) if g.name == group), None)
    if info is None:
        return await transport.length(stream), 0, None
    lag = info.lag if info.lag is not None else await transport.length(stream)
    oldest = None
    if info.pending:
        first = await transport.pending(stream, group, 1)
        if first:
            oldest = max(0, now_ms() - int(first[0].id.split(b"-")[0])) / 1000
    return lag + info.pending, info.pending, oldest


class _Current:
    """Makes a started span current until the block ends, then ends it (lighter than the
    API's generator-based ``start_as_current_span``)."""

    __slots__ = ("span", "_token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = otel_context.attach(otel_trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        span = self.span
        if exc is not None and span.is_recording():
            span.record_exception(exc)
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR,
                                              type(exc).__name__))
        otel_context.detach(self._token)  # type: ignore[arg-type]
        span.end()
