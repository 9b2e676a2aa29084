"""Exporters of a node process: the OpenTelemetry SDK behind ``coordinator node
--metrics-port`` and ``--otlp-endpoint``. The library itself records through
:mod:`coordinator.telemetry` (the API only); only process entry points build these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace

from .errors import ConfigError
from .telemetry import VERSION

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader


class NodeExporters:
    """Providers and exporters of a node process (``coordinator node --metrics-port`` and
    ``--otlp-endpoint``), built on the SDK of the ``otel`` extra.

    :param metrics_port: serve Prometheus text format on this port (0: any free port)
    :param otlp_endpoint: base URL of an OTLP/HTTP receiver for traces and metrics
    :raises ConfigError: when the SDK or the OTLP exporter is not installed
    """

    def __init__(self, *, node_id: str | None, metrics_port: int | None = None,
                 otlp_endpoint: str | None = None, metrics_host: str = "0.0.0.0") -> None:
        try:
            from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        except ImportError:
            raise ConfigError("--metrics-port and --otlp-endpoint need the OpenTelemetry SDK: "
                              "pip install 'kiki-coordinator[otel]'") from None
        from .prometheus import MetricsServer

        attributes = {"service.name": "kiki-coordinator", "service.version": VERSION}
        if node_id:
            attributes["service.instance.id"] = node_id
        resource = Resource.create(attributes)  # OTEL_SERVICE_NAME etc. still apply
        readers: list[MetricReader] = []
        self.tracer_provider: SdkTracerProvider | None = None
        self.metrics_server: MetricsServer | None = None
        if otlp_endpoint:
            readers.append(self._otlp(otlp_endpoint.rstrip("/"), resource))
        if metrics_port is not None:
            pull = InMemoryMetricReader()
            readers.append(pull)
            self.metrics_server = MetricsServer(pull.get_metrics_data, metrics_host,
                                                metrics_port)
        self.meter_provider = SdkMeterProvider(metric_readers=readers, resource=resource)

    def _otlp(self, base: str, resource: object) -> MetricReader:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("--otlp-endpoint needs opentelemetry-exporter-otlp-proto-http: "
                              "pip install 'kiki-coordinator[otel]'") from None
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.tracer_provider = SdkTracerProvider(resource=resource)  # type: ignore[arg-type]
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
        return PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))

    def install_globally(self) -> None:
        """Make these the process's global providers, so spans and metrics of the agents' own
        code (LangGraph runs, HTTP clients) are exported too. For process entry points only."""
        if self.tracer_provider is not None:
            otel_trace.set_tracer_provider(self.tracer_provider)
        otel_metrics.set_meter_provider(self.meter_provider)

    def close(self) -> None:
        """Stop serving and flush what is buffered (spans, the last metrics)."""
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
