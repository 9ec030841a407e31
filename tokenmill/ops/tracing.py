"""Request ids in log lines, and JSON-lines logs.

A request's trace id is the client's `X-Request-Id` header (or `req-<uuid>` when it sent none). The
API process keeps it in a context variable while it handles the request, and passes it to the
engine core with the request (`EngineCoreRequest.trace_id`); both processes name it on their log
lines about that request, so one grep follows a request across processes.

Log records get a `request_id` attribute from, in order: an explicit `extra={"request_id": ...}`,
the context variable, or "-". Text lines show it as `[id]` after the logger name; JSON lines (one
object per line, `TOKENMILL_LOG_JSON=1` or `--log-format json`) carry it as a field, with the
process name, pid and any `extra={"fields": {...}}` merged in.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import re
import time
import uuid

LOG_JSON_ENV = "TOKENMILL_LOG_JSON"
LOG_REQUESTS_ENV = "TOKENMILL_LOG_REQUESTS"
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LEN = 128

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokenmill_request_id", default=None)

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+=-]")


def new_request_id(hex_id: str | None = None) -> str:
    return f"req-{hex_id or uuid.uuid4().hex}"


def sanitize_request_id(value: str | None) -> str | None:
    """A client-given id made safe for logs and headers (printable, no spaces, <= 128 chars);
    None when nothing usable is left."""
    if not value:
        return None
    cleaned = _UNSAFE.sub("_", value.strip())[:MAX_REQUEST_ID_LEN]
    return cleaned or None


def current_request_id() -> str | None:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (explicit extra, else the context variable, else "-")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get() or "-"
        return True


class TextFormatter(logging.Formatter):
    """tokenmill's usual line, with `[request id]` after the logger name when there is one."""

    def __init__(self):
        super().__init__("%(levelname)s %(asctime)s %(name)s%(request_tag)s: %(message)s", "%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.request_tag = f" [{rid}]" if rid and rid != "-" else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC, ms), level, logger, process, pid, request_id,
    msg, exc (when there is a traceback), plus the record's `fields` dict if it has one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        entry = {"ts": ts, "level": record.levelname, "logger": record.name, "process": record.processName,
                 "pid": record.process, "request_id": getattr(record, "request_id", "-"),
                 "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_logs_enabled() -> bool:
    return os.environ.get(LOG_JSON_ENV, "").strip().lower() in ("1", "true", "yes", "json")


def request_logging_enabled() -> bool:
    """Per-request INFO lines (submitted / queued / finished / aborted) in both processes of a
    server; TOKENMILL_LOG_REQUESTS=0 turns them off (the trace id still tags other lines)."""
    return os.environ.get(LOG_REQUESTS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def configure_logging(json_lines: bool | None = None) -> None:
    """Install the request-id filter and the text or JSON formatter on tokenmill's log handlers.
    `json_lines=None` reads TOKENMILL_LOG_JSON. Idempotent; called at start-up by both processes
    of a server (the env var reaches the spawned engine core)."""
    from tokenmill.logger import init_logging

    init_logging()
    if json_lines is None:
        json_lines = json_logs_enabled()
    root = logging.getLogger("tokenmill")
    formatter = JsonFormatter() if json_lines else TextFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class _LogFormatAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        os.environ[LOG_JSON_ENV] = "1" if values == "json" else "0"  # the engine-core process inherits it
        configure_logging(values == "json")


class _TelemetryIntervalAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if values < 0:
            parser.error(f"{option_string} must be >= 0 (0 turns GPU telemetry off), got {values}")
        setattr(namespace, self.dest, values)
        os.environ["TOKENMILL_GPU_TELEMETRY_INTERVAL"] = repr(values)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """`--log-format text|json`; takes effect while parsing (sets TOKENMILL_LOG_JSON for both processes)."""
    parser.add_argument("--log-format", choices=["text", "json"], default="text", action=_LogFormatAction,
                        help="log lines as text (default) or JSON objects, one per line (or TOKENMILL_LOG_JSON=1)")


def add_observability_args(parser: argparse.ArgumentParser) -> None:
    """`--log-format` and `--gpu-telemetry-interval` for `tokenmill serve`. Both act while parsing
    (they set TOKENMILL_LOG_JSON / TOKENMILL_GPU_TELEMETRY_INTERVAL), so registering them is all
    a command needs to do."""
    g = parser.add_argument_group("observability")
    g.add_argument("--log-format", choices=["text", "json"], default="text", action=_LogFormatAction,
                   help="log lines as text (default) or JSON objects, one per line (or TOKENMILL_LOG_JSON=1)")
    g.add_argument("--gpu-telemetry-interval", type=float, default=None, metavar="SECONDS",
                   action=_TelemetryIntervalAction,
                   help="NVML sampling period for the GPU gauges (default 1; 0 = off; or "
                        "TOKENMILL_GPU_TELEMETRY_INTERVAL)")
