"""`tokenmill serve`: start the engine core, then the HTTP server; exit cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.ops.gpu_telemetry import start_gpu_telemetry
from tokenmill.ops.tracing import configure_logging
from tokenmill.server.api_server import build_app
from tokenmill.server.metrics import EngineMetrics

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, but a signal only asks for a graceful stop (finish in-flight requests, exit 0);
    stock uvicorn re-raises the signal after shutdown, which kills the process with it."""

    def __init__(self, config: uvicorn.Config, url: str):
        super().__init__(config)
        self.url = url

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"tokenmill ready: {self.url}/v1 (OpenAI-compatible)", flush=True)


def serve(config: EngineConfig, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_queued_requests: int = 1024, request_timeout: float | None = None,
          graceful_shutdown_timeout: float = 30.0, gpu_telemetry_interval: float | None = None) -> int:
    """`gpu_telemetry_interval`: NVML sampling period in seconds (None: TOKENMILL_GPU_TELEMETRY_INTERVAL
    or 1 s; 0: off). Log lines are JSON when TOKENMILL_LOG_JSON=1 (both processes)."""
    configure_logging()
    model_name = served_model_name or config.model
    metrics = EngineMetrics(model_name)
    engine = AsyncLLM(config, max_queued_requests=max_queued_requests, metrics=metrics)
    logger.info("engine core ready: max_model_len %d, KV cache %d tokens", engine.max_model_len,
                engine.kv_capacity_tokens)
    telemetry = None
    try:
        # In this process, which owns /metrics; absent NVML or GPU: None, no gauges.
        telemetry = start_gpu_telemetry(metrics.registry, gpu_telemetry_interval)
        metrics.live.telemetry = telemetry
        app = build_app(engine, model_name, request_timeout)
        uv_config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=graceful_shutdown_timeout)
        _Server(uv_config, f"http://{host}:{port}").run()
    finally:
        if telemetry is not None:
            telemetry.stop()
        engine.shutdown()
    logger.info("server stopped")
    return 0
