"""`unembed serve`: captioning over HTTP, with requests that arrive together decoded as one batch.

The app (FastAPI on uvicorn) loads the embedder and each decoder once. Every image or vector of
every request becomes one item in a queue per (decoder, decoding options). One worker thread takes
the oldest queue's items, up to `max_batch` of them, and embeds and decodes them together: an idle
server starts on a request at once, and the requests that arrive while a batch is decoded gather
into the next one, so the batch speed-ups of the library become throughput for many small clients
without a lone client waiting for a batch that cannot fill. Each item's caption goes back to its own
request (unembed/batching.py).

The queue is bounded (`max_queue` items): a request that does not fit is refused whole with 503 and
a Retry-After header. A request whose client hangs up (or whose handler is cancelled) has its
queued items dropped; nothing a request does stops the batching thread, and should it stop all the
same, /health answers 503 saying so. With `access_log`, one line per request names the decoder and
the sizes of the batches its items were decoded in.

Bad input never reaches a batch: uploads are read with a size limit and a time limit, decoded with
the image loader's pixel limit (in a thread pool, off the event loop), and options and vector
widths are checked first. Each problem is a 4xx with one JSON error naming it. If a batch still
fails, its items are decoded again one by one, so only the request that caused it fails (a 500
naming the error).

Endpoints: POST /caption (images as multipart files or one raw body), POST /caption/embeddings
(vectors as JSON or a safetensors body), GET /decoders, GET /health, GET / (a page to try it) and
GET /docs (OpenAPI). Responses carry the fields of `unembed caption`'s JSON Lines records.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from unembed.batching import Batcher, Item
from unembed.data import MAX_PIXELS
from unembed.errors import BadInputError, RequestError, UnembedError, did_you_mean
from unembed.generation import GENERATION_OPTIONS
from unembed.serve_schema import IMAGE_TYPES, QUERY_OPTIONS, VECTOR_TYPES, caption_operation, embeddings_operation, \
    health_responses
from unembed.hub import shown_name

API_KEY_ENV = "UNEMBED_API_KEY"
SCENES_ONLY = "the scenes world only: coloured shapes on plain or textured backgrounds (the shipped bundle)"
ACCESS_LOG = logging.getLogger("unembed.access")
PAGE = Path(__file__).parent / "serve_page.html"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32           # items decoded together at most
    max_wait_ms: float = 0.0      # how long the first item of a batch waits for others (0: never, an idle
                                  # server starts at once; batches form behind the one being decoded)
    max_queue: int | None = None  # items waiting at most; past it, 503 + Retry-After. None: 4 x max_batch
                                  # (an accepted item waits behind at most 4 full batches), at least max_items
    access_log: bool = False      # one log line per request (logger "unembed.access"); `unembed serve` sets it
    max_upload_mb: float = 20.0   # one request's body
    max_items: int = 16           # images or vectors per request
    max_pixels: int = MAX_PIXELS  # per image, checked from its header before decoding (the CLI's limit too)
    read_timeout_s: float = 30.0  # a client that has not sent its body by then gets 408
    workers: int = 4              # threads decoding uploaded images
    api_key: str = ""             # when set, every API call needs "Authorization: Bearer KEY"
    device: str = "auto"
    batch_size: int = 32          # the CLI's default, for the equality with `unembed caption`


# --- the models ---------------------------------------------------------------------------------

class Models:
    """The decoders by name, each with its embedder (loaded once per spec)."""

    def __init__(self, decoders: list[str], device: str = "auto"):
        from unembed.bundle import manifest
        from unembed.decoders import find_decoder, load_decoder, read_decoder_config, resolve_embedder_spec
        from unembed.embedders import load_embedder

        if not decoders:  # the bundle: every decoder, the bundle's default first
            info = manifest()
            decoders = [info["default"]] + [n for n in info["decoders"] if n != info["default"]]
        self.decoders, self.embedders, self.bundled = {}, {}, set()
        for given in decoders:
            path, bundled = find_decoder(given)
            spec = resolve_embedder_spec(read_decoder_config(path)["config"], path)
            if spec not in self.embedders:
                self.embedders[spec] = load_embedder(spec, device)
            embedder = self.embedders[spec]
            name = path.name if path.name not in self.decoders else given
            self.decoders[name] = (load_decoder(path, device=str(embedder.device), embedder=embedder), embedder)
            if bundled:
                self.bundled.add(name)
        self.default = next(iter(self.decoders))

    def get(self, name: str | None):
        name = self.default if name is None else name  # decoder= (empty) names no decoder: a 404, not the default
        if name not in self.decoders:
            raise RequestError(404, f"unknown decoder {name!r} (this server has {', '.join(self.decoders)})")
        return name, *self.decoders[name]

    def describe(self) -> list[dict]:
        # Names and kinds only: a directory is shown by its name, never by where it lies on this machine.
        return [{"name": n, "kind": d.kind, "embedder_id": e.id, "embedder": shown_name(e.spec),
                 "embed_dim": d.config.embed_dim, "default": n == self.default,
                 "knows": SCENES_ONLY if n in self.bundled else None} for n, (d, e) in self.decoders.items()]



# --- requests -------------------------------------------------------------------------------------

def decoding_options(query, decoder) -> dict:
    """The decoding options of a request's query string, typed as the one table says
    (unembed/generation.py) and checked against what `decoder` takes: a parameter the endpoint does not
    know, a value of the wrong type, out of bounds or that the decoder does not take is a 422 naming it."""
    known = {"decoder", "name", *QUERY_OPTIONS}
    unknown = sorted(set(query) - known)
    if unknown:
        raise RequestError(422, f"unknown query parameter {unknown[0]!r}{did_you_mean(unknown[0], known)} "
                                f"(this endpoint takes {', '.join(sorted(known))})")
    if len(query.get("name", "")) > 255:  # the schema's bound on an image's name, whatever the body
        raise RequestError(422, "name must be a text of at most 255 characters")
    options = {}
    for wire, name in QUERY_OPTIONS.items():
        if wire in query:
            options[name] = _typed(wire, query[wire], GENERATION_OPTIONS[name].type)
    if options.get("do_sample") is False:
        del options["do_sample"]  # sample=false is the default, said aloud
    try:
        return decoder.check_options(options)
    except BadInputError as e:
        raise RequestError(422, str(e)) from None


def _typed(wire: str, text: str, kind: type):
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "text")
        raise RequestError(422, f"{wire} must be {what}, got {text!r}") from None


def content_type(request, accepted: tuple[str, ...], also: tuple[str, ...] = ()) -> str:
    """The request body's media type, or 415 naming what this endpoint reads (a body without one is
    taken as application/octet-stream)."""
    media = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if media in accepted or media in also or any(media.startswith(p.rstrip("*")) for p in also if p.endswith("*")):
        return media
    raise RequestError(415, f"cannot read a body of type {media!r} here (send {', '.join(accepted)})")


def parse_vectors(body: bytes, content_type: str, dim: int, max_items: int) -> tuple[torch.Tensor, list[str], str]:
    """Vectors [N, D], their ids and the id of the embedder that made them ("" when unsaid) from a JSON
    body ({"vectors": [[...]], "ids": [...], "embedder_id": "..."}, or a bare list of lists) or a
    safetensors body (one [N, D] tensor, or an `unembed embed` file, whose metadata names its embedder)."""
    embedder_id = ""
    if "json" in content_type:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})") from None
        rows = parsed.get("vectors") if isinstance(parsed, dict) else parsed
        ids = parsed.get("ids") if isinstance(parsed, dict) else None
        embedder_id = str(parsed.get("embedder_id") or "") if isinstance(parsed, dict) else ""
        try:
            vectors = torch.tensor(rows, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise RequestError(400, "vectors must be a list of equal-length lists of numbers") from None
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(body)
            embedder_id = _safetensors_metadata(body).get("embedder_id", "")
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise RequestError(400, f"the body is neither JSON nor a safetensors file ({e})") from None
        vectors = tensors.get("vectors", next(iter(tensors.values()), None)) if len(tensors) else None
        ids = None
        if vectors is None:
            raise RequestError(400, "the safetensors body holds no tensor")
        vectors = vectors.float()
    if vectors.ndim != 2 or len(vectors) == 0:
        raise RequestError(400, f"vectors must be [N, D] with N >= 1, got shape {tuple(vectors.shape)}")
    if len(vectors) > max_items:
        raise RequestError(413, f"{len(vectors)} vectors in one request, over the limit of {max_items}")
    if vectors.shape[1] != dim:
        raise RequestError(400, f"vectors are {vectors.shape[1]}-d; this decoder takes {dim}-d vectors")
    if not torch.isfinite(vectors).all():
        raise RequestError(400, "vectors hold NaN or infinite values")
    ids = [str(i) for i in ids] if isinstance(ids, list) and len(ids) == len(vectors) else \
        [str(i) for i in range(len(vectors))]
    return vectors, ids, embedder_id  # as sent: each decoder normalises as its method does


def _safetensors_metadata(body: bytes) -> dict:
    """The __metadata__ of a safetensors file in memory (its JSON header; load() already checked it)."""
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + size]).get("__metadata__") or {}


async def read_body(request, limit: int, timeout: float) -> bytes:
    """The request body, refused past `limit` bytes (413) or when it takes over `timeout` s (408)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {int(declared)} bytes, over the limit of {limit} (--max-upload-mb)")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit} bytes (--max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout:g} s") from None


async def uploaded_images(request, body: bytes, max_items: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each uploaded image: multipart files (any field name), or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def once():
            yield body

        try:
            form = await MultiPartParser(request.headers, once(), max_files=max_items + 1,
                                         max_fields=max_items + 16).parse()
        except MultiPartException as e:
            raise RequestError(400 if "Too many" not in str(e) else 413, f"bad multipart body ({e})") from None
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    else:
        files = [(request.query_params.get("name") or "upload", body)] if body else []
    if not files:
        raise RequestError(400, "no image in the request (send multipart files, or the image as the body)")
    if len(files) > max_items:
        raise RequestError(413, f"{len(files)} images in one request, over the limit of {max_items}")
    return files


async def hung_up(request) -> None:
    """Returns once the client has closed its connection; called after the body has been read, when
    the only message left to receive is the disconnect. Never returns if the server cannot tell."""
    try:
        message = await request.receive()
    except Exception:  # noqa: BLE001 - no way to watch this connection: assume the client stays
        message = {}
    if message.get("type") != "http.disconnect":
        await asyncio.Event().wait()


class AccessLog:
    """ASGI middleware: one line per request on the "unembed.access" logger: client, request line,
    status, milliseconds and, for captioning, the decoder, the request's items and the sizes of the
    batches they were decoded in ("batch=-": none decoded, e.g. refused or the client hung up)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, status, t0 = scope.setdefault("state", {}), 0, time.perf_counter()

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:  # the handler was cancelled: nobody gets an answer
            status = status or 499
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            ACCESS_LOG.info(access_line(scope, status, time.perf_counter() - t0, state.get("batching")))


def access_line(scope, status: int, seconds: float, batching: dict | None) -> str:
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    line = (f'{client[0]}:{client[1]} ' if client else "- ") + \
        f'"{scope["method"]} {scope["path"]}{"?" + query if query else ""} HTTP/{scope.get("http_version", "1.1")}" ' \
        f'{status} {1000 * seconds:.1f} ms'
    if batching:
        sizes = list(dict.fromkeys(item.batch_size for item in batching["items"] if item.batch_size))
        line += f' decoder={batching["decoder"]} items={len(batching["items"])} ' \
                f'batch={",".join(map(str, sizes)) or "-"}'
    return line


# --- the app --------------------------------------------------------------------------------------

def create_app(config: ServeConfig, models: Models | None = None, decoders: list[str] | None = None):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from unembed.data.images import load_image_bytes
    from unembed.pipeline import image_id

    max_queue = config.max_queue or max(4 * config.max_batch, config.max_items)
    if max_queue < config.max_items:
        raise UnembedError(f"--max-queue {max_queue} is below --max-images {config.max_items}: a request that "
                           "large could never be queued")
    models = models or Models(decoders or [], config.device)
    batcher = Batcher(models, config.max_batch, config.max_wait_ms, max_queue)
    pool = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="unembed-images")
    key = config.api_key or os.environ.get(API_KEY_ENV, "")
    limit = int(config.max_upload_mb * 2 ** 20)

    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)  # finish what is queued
        pool.shutdown()

    app = FastAPI(title="unembed", summary="Caption images and embeddings with dynamic batching", lifespan=lifespan)
    app.state.models, app.state.batcher, app.state.config = models, batcher, config

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):  # QueueFull carries its Retry-After header
        return JSONResponse({"error": e.message}, status_code=e.status, headers=getattr(e, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # unknown paths, wrong methods: the same one-line shape
        return JSONResponse({"error": f"{request.method} {request.url.path}: {e.detail}"}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))  # e.g. a 405's Allow

    @app.exception_handler(ClientDisconnect)
    async def client_left(request, e: ClientDisconnect):  # mid-body: nobody to answer, and no fault of ours to log
        return JSONResponse({"error": "the client closed the connection before its body arrived"}, status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug: one JSON line; uvicorn logs the traceback
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        if key and request.url.path not in ("/", "/health", "/docs", "/openapi.json") \
                and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": "missing or wrong API key (send Authorization: Bearer KEY)"}, status_code=401)
        return await call_next(request)

    if config.access_log:
        app.add_middleware(AccessLog)  # outermost: it sees every status, the 401s included

    async def answer(request: Request, key: tuple, items: list[Item]) -> list[dict]:
        """The captions of a request's items, once all are decoded. When the client hangs up first,
        or the handler is cancelled, the request's items not yet taken are dropped from the queue."""
        request.state.batching = {"decoder": key[0], "items": items}  # for the access log
        futures = batcher.submit(key, items)  # 503 when full: none of this request's items is queued
        captions = asyncio.gather(*map(asyncio.wrap_future, futures))
        gone = asyncio.ensure_future(hung_up(request))
        try:
            await asyncio.wait((captions, gone), return_when=asyncio.FIRST_COMPLETED)
            if not captions.done():
                raise RequestError(499, "the client closed the connection before its answer")
            return captions.result()
        except RequestError:
            raise
        except UnembedError as e:
            raise RequestError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - a decoding error fails this request only
            raise RequestError(500, f"decoding failed: {type(e).__name__}: {e}") from None
        finally:
            gone.cancel()
            for future in futures:  # nothing once decoding or done; else the item is skipped, never decoded
                future.cancel()
            captions.cancel()
            captions.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning

    names = list(models.decoders)
    widths = {d.config.embed_dim for d, _ in models.decoders.values() if not d.needs_tokens}

    @app.post("/caption", summary="Caption images (multipart files, or one image as the body)",
              openapi_extra=caption_operation(names, config.max_items))
    async def caption(request: Request) -> list[dict]:
        name, decoder, _ = models.get(request.query_params.get("decoder"))
        options = decoding_options(request.query_params, decoder)
        content_type(request, ("multipart/form-data", *IMAGE_TYPES), also=("image/*",))
        body = await read_body(request, limit, config.read_timeout_s)
        files = await uploaded_images(request, body, config.max_items)
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(*(loop.run_in_executor(pool, load_image_bytes, data, file, config.max_pixels)
                                        for file, data in files), return_exceptions=True)
        for image in images:
            if isinstance(image, BadInputError):
                raise RequestError(413 if "limit" in image.reason else 400, str(image))
            if isinstance(image, BaseException):
                raise RequestError(400, f"cannot decode an upload ({type(image).__name__})")
        items = [Item(image, {"file": file, "image_id": image_id(file)}) for (file, _), image in zip(files, images)]
        return await answer(request, (name, "images", tuple(sorted(options.items()))), items)

    @app.post("/caption/embeddings", summary="Caption vectors (JSON {\"vectors\": [[...]]} or safetensors bytes)",
              openapi_extra=embeddings_operation([n for n, (d, _) in models.decoders.items() if not d.needs_tokens],
                                                 config.max_items, next(iter(widths)) if len(widths) == 1
                                                 else None))
    async def caption_embeddings(request: Request) -> list[dict]:
        from unembed.embedders import same_embedder

        name, decoder, _ = models.get(request.query_params.get("decoder"))
        options = decoding_options(request.query_params, decoder)
        media = content_type(request, VECTOR_TYPES)
        if decoder.needs_tokens:
            raise RequestError(422, f"the {decoder.kind} decoder needs image tokens, which a vector does not carry")
        body = await read_body(request, limit, config.read_timeout_s)
        vectors, ids, made_by = parse_vectors(body, media, decoder.config.embed_dim, config.max_items)
        if made_by and decoder.config.embedder_id and not same_embedder(made_by, decoder.config.embedder_id):
            raise RequestError(400, f"the vectors were made by embedder {made_by!r}; decoder {name} was built for "
                                    f"{decoder.config.embedder_id!r}")
        items = [Item(v, {"image_id": i}) for v, i in zip(vectors, ids)]
        return await answer(request, (name, "vectors", tuple(sorted(options.items()))), items)

    @app.get("/decoders", summary="The loaded decoders: names, kinds, embedder ids")
    async def list_decoders() -> list[dict]:
        return models.describe()

    @app.get("/health", summary="Liveness and batching counters (503 once the batching thread has stopped)",
             responses=health_responses())
    async def health() -> dict:
        if (problem := batcher.health()) is not None:
            raise RequestError(503, problem)
        return {"status": "ok", "decoders": list(models.decoders), **batcher.stats, "queued": batcher.queued,
                "max_queue": batcher.max_queue}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    return app


def serve(config: ServeConfig, decoders: list[str] | None = None, log=print) -> None:
    import uvicorn

    app = create_app(config, decoders=decoders)
    names = ", ".join(app.state.models.decoders)
    handler = logging.StreamHandler()  # stderr: the access lines and the batcher's errors
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("unembed")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if config.access_log else logging.WARNING)
    log(f"serving {names} on http://{config.host}:{config.port} (page at /, API docs at /docs); at most "
        f"{app.state.batcher.max_queue} items queued; Ctrl-C stops")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=30)
