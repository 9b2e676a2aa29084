"""Prometheus text format for a node's metrics, served over HTTP from a background thread.

It reads the OpenTelemetry SDK's collected metrics by shape (sums, gauges, histograms), so it
needs neither ``prometheus_client`` nor an import of opentelemetry here.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def metric_name(name: str, unit: str, counter: bool) -> str:
    """``kiki.handler.duration`` in ``s`` -> ``kiki_handler_duration_seconds``."""
    base = _INVALID.sub("_", name)
    suffix = _UNITS.get(unit)
    if suffix and not base.endswith(suffix):
        base = f"{base}_{suffix}"
    return f"{base}_total" if counter else base


def _labels(attributes: Any, extra: str = "") -> str:
    parts = [f'{_INVALID.sub("_", str(k))}="{_escape(v)}"' for k, v in
             sorted((attributes or {}).items())]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value) if isinstance(value, float) else str(value)


def render(metrics_data: Any) -> str:
    """Prometheus text exposition of an SDK ``MetricsData`` (None: nothing collected)."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for metric in _metrics(metrics_data):
        data = metric.data
        points = list(data.data_points)
        if points and hasattr(points[0], "bucket_counts"):
            kind = "histogram"
        elif getattr(data, "is_monotonic", False):
            kind = "counter"
        else:
            kind = "gauge"  # gauges and up-down sums
        name = metric_name(metric.name, metric.unit, kind == "counter")
        family = families.setdefault(name, (kind, metric.description, []))
        lines = family[2]
        for point in points:
            if kind == "histogram":
                cumulative = 0
                bounds = [*point.explicit_bounds, math.inf]
                for bound, count in zip(bounds, point.bucket_counts):
                    cumulative += count
                    le = f'le="{_number(float(bound))}"'
                    lines.append(f"{name}_bucket{_labels(point.attributes, le)} {cumulative}")
                lines.append(f"{name}_sum{_labels(point.attributes)} {_number(point.sum)}")
                lines.append(f"{name}_count{_labels(point.attributes)} {point.count}")
            else:
                lines.append(f"{name}{_labels(point.attributes)} {_number(point.value)}")
    out = []
    for name, (kind, description, lines) in sorted(families.items()):
        if description:
            out.append(f"# HELP {name} {_escape(description)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _metrics(metrics_data: Any) -> Iterable[Any]:
    if metrics_data is None:
        return
    for resource_metrics in metrics_data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            yield from scope_metrics.metrics


class MetricsServer:
    """Serves ``GET /metrics`` (any path, in fact) on a background thread.

    :param collect: returns the SDK's current ``MetricsData``
    :param port: 0 picks a free port; :attr:`port` tells which
    """

    def __init__(self, collect: Callable[[], Any], host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                try:
                    body = render(collect()).encode()
                    status = 200
                except Exception:  # a broken callback must not kill the endpoint
                    log.exception("collecting metrics failed")
                    body, status = b"collecting metrics failed\n", 500
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics request: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="kiki-metrics", daemon=True)
        self._thread.start()
        log.info("serving Prometheus metrics on %s:%d", host, self.port)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
