"""The service on LitServe, which gives dynamic batching (``max_batch_size`` /
``batch_timeout``), several inference workers per device, request timeouts (504), ``/health``
(200 once every worker has loaded the model, 503 before), ``/info`` and a graceful shutdown on
Ctrl+C. What is ours: the request (multipart/form-data, one file field ``splat`` or ``image``,
optional ``topk``, ``embedding=false`` for the top-k alone); refusals that stay alone
(LitServe fails a whole batch when one request raises, so a refused request is a value,
:class:`~.engine.Rejected`, that only its own response turns into a 4xx); :class:`UploadGate`
(415 / 413 / 400 where LitServe would answer 500); ``/live``; and SIGTERM taking the graceful
path too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal

import litserve as ls
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from .engine import KINDS, Engine, EngineConfig, Item, Rejected

PREDICT_PATH = "/predict"


@dataclasses.dataclass
class ServeConfig:
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_timeout: float = 0.01  # seconds a batch waits to fill
    workers: int = 1  # inference processes per device
    api_servers: int = 1  # HTTP processes
    timeout: float = 30.0  # seconds a request may wait for a worker before a 504
    max_request_bytes: int = 8 << 20
    accelerator: str = "auto"


class SplatAPI(ls.LitAPI):
    """One inference worker: an :class:`Engine` per process, batches of decoded uploads."""

    def __init__(self, config: ServeConfig):
        super().__init__(
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            api_path=PREDICT_PATH,
        )
        self.engine_config = config.engine

    def setup(self, device):
        self.engine = Engine(self.engine_config, device=device)

    def decode_request(self, request) -> Item | Rejected:
        fields = [kind for kind in KINDS if kind in request]
        if len(fields) != 1:
            return Rejected(
                400, f"send multipart/form-data with exactly one file field of {list(KINDS)}"
            )
        upload = request[fields[0]]
        if not hasattr(upload, "file"):
            return Rejected(400, f"the {fields[0]!r} field must be a file, not a text field")
        topk = request.get("topk")
        if topk is not None:
            try:
                topk = int(topk)
            except (TypeError, ValueError):  # text that is no number, or a file
                return Rejected(400, f"topk must be an int, got {topk!r:.40}")
        embedding = str(request.get("embedding", "true")).lower()
        if embedding not in ("true", "false", "1", "0"):
            return Rejected(400, f"embedding must be true or false, got {embedding!r:.40}")
        data = upload.file.read()
        return self.engine.decode(fields[0], data, topk, embedding in ("true", "1"))

    def batch(self, inputs):
        return list(inputs)

    def predict(self, items):
        single = not isinstance(items, list)  # max_batch_size=1: LitServe passes one
        items = [items] if single else items
        valid = [item for item in items if isinstance(item, Item)]
        results = iter(self.engine.predict(valid) if valid else [])
        outputs = [next(results) if isinstance(item, Item) else item for item in items]
        return outputs[0] if single else outputs

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        return output


class UploadGate:
    """ASGI middleware in front of the predict path: a POST that is not multipart/form-data
    gets a 415, one over the size limit a 413, and one whose multipart framing does not parse a
    400, each saying what to send. (LitServe would read the first as JSON and answer the
    others with a 500: its handler does not know starlette's own HTTPException.) The checked
    body is then handed on unchanged."""

    def __init__(self, app, path: str = PREDICT_PATH, max_bytes: int = 8 << 20):
        self.app, self.path, self.max_bytes = app, path, max_bytes

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope["path"] == self.path):
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            return await _refuse(scope, receive, send, 415, SEND_THIS)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                detail = f"the request is over the server's limit of {self.max_bytes} bytes"
                return await _refuse(scope, receive, send, 413, detail)
            more = message.get("more_body", False)
        try:
            form = await MultiPartParser(headers, _once(bytes(body))).parse()
            await form.close()
        except MultiPartException as exc:
            return await _refuse(scope, receive, send, 400, f"{exc.message} {SEND_THIS}")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


SEND_THIS = "Send multipart/form-data with one file field 'splat' (.splat bytes) or 'image'."


async def _once(body: bytes):
    yield body


async def _refuse(scope, receive, send, status: int, detail: str):
    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def build_server(config: ServeConfig, metadata: dict | None = None) -> ls.LitServer:
    """A LitServer for ``config`` (not started); ``metadata`` is what ``/info`` shows."""
    server = ls.LitServer(
        SplatAPI(config),
        accelerator=config.accelerator,
        workers_per_device=config.workers,
        timeout=config.timeout,
        max_payload_size=None,  # UploadGate's limit answers with a 413 (LitServe's: a 500)
        middlewares=[(UploadGate, {"max_bytes": config.max_request_bytes})],
        model_metadata=metadata,
    )

    @server.app.get("/live")
    async def live():  # the process answers (readiness is /health)
        return {"status": "live"}

    return server


def serve(config: ServeConfig) -> None:
    """Check that the model loads (here, so a bad run or class list is a clear error before any
    worker starts), then serve until SIGTERM / Ctrl+C."""
    engine = Engine(config.engine)
    metadata = {**engine.describe(), "max_request_bytes": config.max_request_bytes}
    del engine
    server = build_server(config, metadata)
    # LitServe shuts down gracefully (workers stopped, in-flight requests answered) on Ctrl+C
    # only; SIGTERM (docker stop, Kubernetes, a test) would kill this process and orphan them.
    previous = signal.signal(signal.SIGTERM, functools.partial(_interrupt, os.getpid()))
    try:
        server.run(
            host=config.host,
            port=config.port,
            num_api_servers=config.api_servers,
            generate_client_file=False,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(main_pid: int, signum, frame):
    if os.getpid() != main_pid:  # a forked HTTP server, re-raising once it has shut down
        raise SystemExit(0)
    raise KeyboardInterrupt
