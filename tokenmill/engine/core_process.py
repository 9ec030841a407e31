"""The engine core in its own process, and the client the API process talks to it through.

Transport: two ZMQ PUSH/PULL pairs over ipc:// sockets (requests in, outputs out). Messages are
the dataclasses of `engine/messages.py`, pickled: both ends are our own code on one host, the
messages are small, and pickle keeps them plain dataclasses with no schema to maintain twice.

The core loop never waits on the API process: it drains whatever requests arrived, runs one step
if it has work, pushes that step's outputs, and only blocks on its input socket when idle.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import zmq

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import EngineCoreOutputs, EngineCoreRequest
from tokenmill.engine.request import RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class AbortRequests:
    request_ids: list[str]
    status: RequestStatus = RequestStatus.FINISHED_ABORTED


@dataclass
class Shutdown:
    pass


@dataclass
class EngineReady:
    """Sent once after start-up: what the front end needs to validate requests."""

    max_model_len: int
    kv_capacity_tokens: int
    num_kv_blocks: int
    block_size: int


@dataclass
class EngineFailed:
    error: str


def run_engine_core(config: EngineConfig, input_address: str, output_address: str) -> None:
    """Entry point of the engine-core process."""
    # The API process handles SIGINT/SIGTERM and tells us to stop; a Ctrl-C in the terminal
    # must not kill the core mid-step before the API process has drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from tokenmill.ops.tracing import configure_logging, request_logging_enabled

    configure_logging()  # request ids on log lines; JSON lines when TOKENMILL_LOG_JSON=1
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_address)
    try:
        from tokenmill.engine.engine_core import EngineCore

        core = EngineCore(config)
        core.log_requests = request_logging_enabled()
        outbox.send(pickle.dumps(EngineReady(core.max_model_len, core.kv_capacity_tokens, core.num_kv_blocks,
                                             config.block_size)))
        _busy_loop(core, inbox, outbox)
    except Exception:
        error = traceback.format_exc()
        logger.error("engine core failed:\n%s", error)
        outbox.send(pickle.dumps(EngineFailed(error)))
        time.sleep(0.1)  # let the message leave before the process exits
        os._exit(1)
    finally:
        ctx.destroy(linger=100)


def _busy_loop(core, inbox, outbox) -> None:
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    while True:
        # Idle: block until a message comes. Busy: take only what is already there.
        timeout = 0 if core.has_unfinished_requests() else None
        if timeout is None:
            core.idle()  # the wait below is no engine stall: the next step reports no idle gap
        received = False
        while poller.poll(timeout):
            message = pickle.loads(inbox.recv())
            if isinstance(message, EngineCoreRequest):
                core.add_request(message)
            elif isinstance(message, AbortRequests):
                core.abort_requests(message.request_ids, message.status)
            elif isinstance(message, Shutdown):
                return
            timeout, received = 0, True
        if core.has_unfinished_requests():
            outbox.send(pickle.dumps(core.step()))
        elif received:
            # Aborts that emptied the engine: publish the freed state, no step will.
            outbox.send(pickle.dumps(EngineCoreOutputs(stats=core.scheduler.stats())))


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; in-flight and new requests fail."""


class EngineCoreClient:
    """Starts the engine-core process and moves messages to and from it (API-process side).

    Sending is synchronous (a PUSH never blocks for long); outputs are read by a background
    thread that hands them to `on_outputs`. A watchdog notices the process dying.
    """

    def __init__(self, config: EngineConfig, startup_timeout: float = 600.0):
        self._dir = tempfile.mkdtemp(prefix="tokenmill-")
        input_address = f"ipc://{self._dir}/input"
        output_address = f"ipc://{self._dir}/output"
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.bind(input_address)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(output_address)
        self._send_lock = threading.Lock()
        self.dead = False
        self.death_reason = ""
        self._closing = False
        mp = multiprocessing.get_context("spawn")
        self.process = mp.Process(target=run_engine_core, args=(config, input_address, output_address),
                                  name="tokenmill-engine-core", daemon=True)
        self.process.start()
        self.ready = self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> EngineReady:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._output.poll(200):
                message = pickle.loads(self._output.recv())
                if isinstance(message, EngineReady):
                    return message
                if isinstance(message, EngineFailed):
                    self.close()
                    raise RuntimeError(f"engine core failed to start:\n{message.error}")
            if not self.process.is_alive():
                self.close()
                raise RuntimeError(f"engine core process exited during start-up (code {self.process.exitcode})")
        self.close()
        raise RuntimeError(f"engine core not ready after {timeout:.0f} s")

    def send(self, message) -> None:
        if self.dead:
            raise EngineDeadError(self.death_reason or "engine core is not running")
        with self._send_lock:
            self._input.send(pickle.dumps(message))

    def add_request(self, request: EngineCoreRequest) -> None:
        self.send(request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        if request_ids and not self.dead:
            self.send(AbortRequests(list(request_ids), status))

    def start_output_thread(self, on_outputs, on_death) -> None:
        """Call on_outputs(EngineCoreOutputs) for every batch; on_death(reason) once if the core dies."""

        def loop():
            while True:
                if self._output.poll(250):
                    try:
                        message = pickle.loads(self._output.recv())
                    except zmq.ZMQError:
                        return  # closed
                    if isinstance(message, EngineCoreOutputs):
                        on_outputs(message)
                    elif isinstance(message, EngineFailed):
                        self._mark_dead(f"engine core failed: {message.error.strip().splitlines()[-1]}", on_death)
                        return
                elif not self.process.is_alive():
                    self._mark_dead(f"engine core process exited (code {self.process.exitcode})", on_death)
                    return
                if self._closing:
                    return

        self._thread = threading.Thread(target=loop, name="tokenmill-engine-outputs", daemon=True)
        self._thread.start()

    def _mark_dead(self, reason: str, on_death) -> None:
        if not self.dead:
            self.dead, self.death_reason = True, reason
            logger.error("%s", reason)
            on_death(reason)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the core to stop, wait for it, then terminate it if it did not."""
        self._closing = True
        if self.process.is_alive():
            try:
                with self._send_lock:
                    self._input.send(pickle.dumps(Shutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(1)
        self._ctx.destroy(linger=0)
