"""The CONSUMER side of tracing: one handler run as a span (with retry links and the
dead-letter event), its duration and the message's end-to-end latency. Built by
:meth:`coordinator.telemetry.Telemetry.process`."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from .registry import now_ms
from .signals import Reject, Retry

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - Telemetry never builds a span without the API
    pass

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .delivery import Delivery
    from .telemetry import Telemetry


#: About how many messages a second (per node) have their handler duration and end-to-end
#: latency recorded in the histograms: one SDK histogram measurement costs ~6 us, more than
#: handling a small message.
HISTOGRAM_MEASUREMENTS_PER_S = 1_000


class Thinning:
    """Picks about ``per_second`` of a stream of events each second (all of them below that
    rate): every k-th, k set from the rate of the last tenth of a second, and nothing more in
    a tenth whose share is used up (a burst).

    A systematic sample: the distribution of what is picked stays that of all events, while
    the count does not (rates come from the message counters instead).
    """

    WINDOW_S = 0.1

    def __init__(self, per_second: int) -> None:
        self._per_window = max(1, round(per_second * self.WINDOW_S))
        self._stride = 1
        self._seen = 0
        self._window_seen = 0
        self._window_picked = 0
        self._window_end = 0.0

    def take(self) -> bool:
        """Count one event; True when it is picked."""
        now = time.monotonic()
        if now >= self._window_end:
            self._stride = max(1, math.ceil(self._window_seen / self._per_window))
            self._window_seen = self._window_picked = 0
            self._window_end = now + self.WINDOW_S
        self._seen += 1
        self._window_seen += 1
        if self._seen % self._stride or self._window_picked >= self._per_window:
            return False
        self._window_picked += 1
        return True


class Processing:
    """One handler run: the CONSUMER span (current while the handler runs, so the handler's
    own spans are its children), handler duration and end-to-end latency."""

    __slots__ = ("_telemetry", "_delivery", "_agent_id", "_topic", "span", "_token",
                 "_started", "_outcome", "_timed")

    def __init__(self, telemetry: Telemetry, delivery: Delivery, agent_id: str,
                 topic: str | None) -> None:
        self._telemetry = telemetry
        self._delivery = delivery
        self._agent_id = agent_id
        self._topic = topic
        self.span: Span | None = None
        self._token: object = None
        self._started = 0.0
        self._outcome = "ok"
        self._timed = False

    def __enter__(self) -> Processing:
        telemetry = self._telemetry
        if not telemetry.active:
            return self
        envelope, delivery = self._delivery.envelope, self._delivery
        assert envelope is not None
        destination = self._topic or self._agent_id
        # Without a meter nothing is timed: the sampler and the no-op instruments cost ~0.5 us.
        self._timed = telemetry.metering and telemetry.histogram_sample.take()
        if self._timed:
            telemetry._latency.record(max(0, now_ms() - envelope.created_ms) / 1000,
                                      telemetry._attributes(destination, self._agent_id))
            self._started = time.perf_counter()
        if not telemetry.tracing:
            return self
        parent, sampled = telemetry._parent_of(envelope)
        if sampled is False and telemetry.trust_parent_sampling:
            # The trace was not sampled where it began, and parent-based sampling (the SDK
            # default) would only build a non-recording span here: handle the message under
            # the sender's context instead, so the handler's spans and the messages it sends
            # stay in that trace, at a fraction of the cost.
            self._token = otel_context.attach(parent)  # type: ignore[arg-type]
            return self
        attributes: dict[str, str | int] = {
            "messaging.system": "redis", "messaging.operation.type": "process",
            "messaging.destination.name": destination,
            "messaging.consumer.group.name": self._agent_id,
            "messaging.message.id": envelope.id,
            "messaging.redis.delivery_count": delivery.deliveries,
            "kiki.agent_id": self._agent_id, "kiki.node_id": telemetry.node_id}
        if envelope.session_id:
            attributes["kiki.session_id"] = envelope.session_id
        if envelope.correlation_id:
            attributes["messaging.message.conversation_id"] = envelope.correlation_id
        self.span = span = telemetry._tracer.start_span(
            f"process {destination}", context=parent,  # type: ignore[arg-type]
            kind=otel_trace.SpanKind.CONSUMER, attributes=attributes,
            links=self._retry_links(parent) if delivery.deliveries > 1 else None)
        self._token = otel_context.attach(otel_trace.set_span_in_context(span))
        return self

    def _retry_links(self, parent: object) -> list[otel_trace.Link]:
        """A redelivery links to the sending span and, when it ran here, the last attempt."""
        envelope = self._delivery.envelope
        assert envelope is not None
        attempt = self._delivery.deliveries
        links = []
        producer = otel_trace.get_current_span(parent).get_span_context()  # type: ignore[arg-type]
        if producer.is_valid:
            links.append(otel_trace.Link(producer, {"kiki.link": "producer",
                                                    "kiki.attempt": attempt}))
        previous = self._telemetry._attempts.pop(envelope.id, None)
        if previous is not None:
            links.append(otel_trace.Link(previous, {  # type: ignore[arg-type]
                "kiki.link": "previous_attempt", "kiki.attempt": attempt - 1}))
        return links

    def failed(self, exc: BaseException, *, dead_lettered: bool) -> None:
        """Note how the run ended: retried later, or dead-lettered for good."""
        span = self.span
        if isinstance(exc, Retry):
            self._outcome = "retry"
        else:
            self._outcome = "error"
        if span is None:
            return
        if not isinstance(exc, Retry):
            span.record_exception(exc)
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR,
                                              type(exc).__name__))
        if dead_lettered:
            span.add_event("dead_lettered", {
                "kiki.dead_letter.reason": "rejected" if isinstance(exc, Reject) else "failed",
                "messaging.redis.delivery_count": self._delivery.deliveries})
        else:
            envelope = self._delivery.envelope
            assert envelope is not None
            span.add_event("retry_scheduled", {"kiki.attempt": self._delivery.deliveries})
            self._telemetry._remember_attempt(envelope.id, span.get_span_context())

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        telemetry = self._telemetry
        duration = time.perf_counter() - self._started if self._timed else 0.0
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        span = self.span
        if span is not None:
            if exc is not None and self._outcome == "ok":  # cancelled, or not noted by failed()
                span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR,
                                                  type(exc).__name__))
            span.end()
        if self._timed:
            telemetry._duration.record(duration, telemetry._attributes(
                self._topic or self._agent_id, self._agent_id, self._outcome))

