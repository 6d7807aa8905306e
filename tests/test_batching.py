"""`unembed serve`'s batcher (unembed/batching.py) under what can go wrong around it: requests
cancelled while their items wait or decode (in-process, through httpx's ASGI transport), clients that
hang up mid-request (real HTTP), a full queue (503 with Retry-After, never a request accepted and
then dropped), an error inside the loop, a thread that stops (/health says so). After each, ordinary
requests are answered with `unembed caption`'s captions. Also: an idle server starts a lone request
at once and batches form behind a running one, and the access log names decoder and batch size.

No assertion is on time: a decode is held at a gate (an Event) wherever the order of events
matters, and waits are bounded only so that a hang fails instead of blocking the suite."""
import asyncio
import contextlib
import logging
import socket
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_serve import DECODERS, Server, cli_captions, images  # noqa: F401, F811 - fixtures, reused
from unembed.cli import EXIT_FAILED, EXIT_OK, main

HANG = 60  # seconds before a wait that should end at once counts as a hang


@pytest.fixture(scope="module")
def models():
    from unembed.serve import Models

    return Models(DECODERS, "cpu")


@contextlib.contextmanager
def app_with(models, **options):
    """An app (in-process: no server, no port) on the shared models; its batcher closed after."""
    from unembed.serve import ServeConfig, create_app

    app = create_app(ServeConfig(device="cpu", **{"max_queue": 64, **options}), models=models)
    try:
        yield app
    finally:
        app.state.batcher.close()


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=HANG)


def upload(path, name=None) -> dict:
    return {"files": {"file": (name or path.name, path.read_bytes(), "image/png")}}


class Gate:
    """Holds the batcher inside its decode, for a batch holding an item of one of the `held` files,
    until `open()`: what is submitted meanwhile waits in the queue, in a known state."""

    def __init__(self, batcher, monkeypatch, held=("gate.png",)):
        self.entered, self.opened, real = threading.Event(), threading.Event(), batcher._decode

        def decode(key, batch):
            if any(item.record.get("file") in held for item in batch):
                self.entered.set()
                assert self.opened.wait(HANG), "the gate was never opened"
            return real(key, batch)

        monkeypatch.setattr(batcher, "_decode", decode)

    def open(self):
        self.opened.set()


def until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


async def until_async(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def queued_items(batcher) -> list:
    with batcher.lock:
        return [item for queue in batcher.queues.values() for item in queue]


async def all_answered_like_unembed_caption(http, images, cli_captions) -> dict:
    """Every image with every decoder, concurrently: each a 200 with `unembed caption`'s caption; the
    server's /health after."""
    jobs = [(path, decoder) for decoder in DECODERS for path in images]
    replies = await asyncio.wait_for(asyncio.gather(*(http.post("/caption", params={"decoder": decoder},
                                                                **upload(path)) for path, decoder in jobs)), HANG)
    for (path, decoder), reply in zip(jobs, replies):
        assert reply.status_code == 200, (path.name, decoder, reply.text)
        assert reply.json()[0]["caption"] == cli_captions[decoder][path.name], (path.name, decoder)
    health = await http.get("/health")
    assert health.status_code == 200, health.text
    return health.json()


# --- cancelled requests (in-process) ---------------------------------------------------------------

def test_requests_cancelled_while_their_items_wait_are_skipped(models, images, cli_captions, monkeypatch):
    with app_with(models, max_batch=4) as app:
        batcher = app.state.batcher
        gate = Gate(batcher, monkeypatch)

        async def run():
            async with asgi_client(app) as http:
                held = asyncio.create_task(http.post("/caption", **upload(images[0], "gate.png")))
                await until_async(gate.entered.is_set, "the first request decodes")
                waiting = [asyncio.create_task(http.post("/caption", **upload(p))) for p in images[1:7]]
                await until_async(lambda: len(queued_items(batcher)) == 6, "6 items queued behind it")
                for task in waiting:
                    task.cancel()
                outcomes = await asyncio.gather(*waiting, return_exceptions=True)
                assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
                gate.open()
                assert (await held).status_code == 200
                return await all_answered_like_unembed_caption(http, images, cli_captions)

        health = asyncio.run(run())
    assert health["cancelled_items"] == 6 and health["loop_errors"] == 0
    assert health["items"] == 1 + 2 * len(images)  # the cancelled items were never decoded


def test_requests_cancelled_while_their_items_decode_leave_the_batcher_working(models, images, cli_captions,
                                                                                  monkeypatch):
    with app_with(models, max_batch=4) as app:
        batcher = app.state.batcher
        gate = Gate(batcher, monkeypatch)
        second = Gate(batcher, monkeypatch, held=("decoding.png",))  # wraps the first

        async def run():
            async with asgi_client(app) as http:
                first = asyncio.create_task(http.post("/caption", **upload(images[0], "gate.png")))
                await until_async(gate.entered.is_set, "the first request decodes")
                decoding = [asyncio.create_task(http.post("/caption", **upload(p, "decoding.png"))) for p in images[1:4]]
                await until_async(lambda: len(queued_items(batcher)) == 3, "3 more queued")
                gate.open()  # the 3 are taken as one batch, held at the second gate
                assert (await first).status_code == 200
                await until_async(second.entered.is_set, "the 3 decode")
                for task in decoding:
                    task.cancel()
                outcomes = await asyncio.gather(*decoding, return_exceptions=True)
                assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
                second.open()
                return await all_answered_like_unembed_caption(http, images, cli_captions)

        health = asyncio.run(run())
    assert health["cancelled_items"] == 0 and health["loop_errors"] == 0 and health["largest_batch"] >= 3


# --- clients that hang up (real HTTP) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    s = Server(max_batch=4, max_items=4, max_queue=64)
    yield s
    s.stop()


def open_request(port: int, path: str, body: bytes, sent: int | None = None) -> socket.socket:
    """A raw HTTP client that has sent its request (or `sent` bytes of its body) and waits."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {len(body)}"
                   f"\r\n\r\n".encode() + body[:sent])
    return client


def test_50_clients_hanging_up_mid_request_leave_the_server_answering(server, images, cli_captions, monkeypatch,
                                                                      caplog):
    """40 clients send their image and hang up while it waits in the queue (the server notices and
    drops it undecoded), 10 hang up halfway through their body (not an error of the server's: no
    traceback logged); then ordinary requests."""
    batcher = server.app.state.batcher
    before = dict(batcher.stats)
    gate = Gate(batcher, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, f"{server.url}/caption", timeout=HANG, **upload(images[0], "gate.png"))
        until(gate.entered.is_set, "the first request decodes")
        data = images[1].read_bytes()
        waiting = [open_request(server.config.port, f"/caption?name=hangup-{i}.png", data) for i in range(40)]
        cut = [open_request(server.config.port, f"/caption?name=cut-{i}.png", data, len(data) // 2) for i in range(10)]
        until(lambda: len(queued_items(batcher)) == 40, "the 40 images are queued")
        for client in waiting + cut:
            client.close()
        until(lambda: all(item.future.cancelled() for item in queued_items(batcher)), "the server sees the hang-ups")
        gate.open()
        assert held.result(HANG).status_code == 200
    health = asyncio.run(through_http(server.url, images, cli_captions))
    assert health["cancelled_items"] - before["cancelled_items"] == 40  # dropped undecoded
    assert health["items"] - before["items"] == 1 + 2 * len(images) and health["loop_errors"] == 0
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def through_http(url, images, cli_captions) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=HANG) as http:
        return await all_answered_like_unembed_caption(http, images, cli_captions)


# --- backpressure --------------------------------------------------------------------------------------

def check_burst_reply(reply, names, cli_captions) -> int:
    """A burst's reply is a 200 with every caption right or a 503 with Retry-After: the items it got."""
    if reply.status_code == 503:
        assert int(reply.headers["retry-after"]) >= 1 and set(reply.json()) == {"error"}, reply.headers
        assert "--max-queue" in reply.json()["error"]
        return 0
    assert reply.status_code == 200, reply.text
    assert [r["caption"] for r in reply.json()] == [cli_captions["clipcap"][n.split("~")[1]] for n in names]
    return len(names)


def test_a_full_queue_refuses_whole_requests_with_503_and_retry_after(server, images, cli_captions, monkeypatch):
    """A burst of 16 requests (1 or 2 images) at a queue of 4 behind a held decode: exactly 4 items
    are taken, every other request is refused whole; once the decode goes on, every taken request
    is answered. Then a burst at a slowed (not held) decoder: each answered right or refused."""
    batcher = server.app.state.batcher
    monkeypatch.setattr(batcher, "max_queue", 4, raising=False)
    gate = Gate(batcher, monkeypatch)

    def post(names):
        files = [("files", (name, images[0].parent.joinpath(name.split("~")[1]).read_bytes(), "image/png"))
                 for name in names]
        return httpx.post(f"{server.url}/caption", files=files, timeout=HANG)

    burst = [[f"r{r}i{i}~{images[(r + i) % len(images)].name}" for i in range(1 + r % 3 // 2)] for r in range(16)]
    refused_before = batcher.stats["refused_requests"]
    with ThreadPoolExecutor(len(burst) + 1) as pool:
        held = pool.submit(httpx.post, f"{server.url}/caption", timeout=HANG, **upload(images[0], "gate.png"))
        until(gate.entered.is_set, "the first request decodes")
        replies = [pool.submit(post, names) for names in burst]

        def settled():
            taken = {item.record["file"].split("i")[0] for item in queued_items(batcher)}
            return len(taken) + batcher.stats["refused_requests"] - refused_before == len(burst)

        until(settled, "every request of the burst is queued or refused")
        assert len(queued_items(batcher)) == 4
        gate.open()
        assert held.result(HANG).status_code == 200
        answered = [check_burst_reply(reply.result(HANG), names, cli_captions) for reply, names in zip(replies, burst)]
    assert sum(answered) == 4 and answered.count(0) == batcher.stats["refused_requests"] - refused_before

    real = batcher._decode  # the gate's: opened, it only decodes

    def slowed(key, batch):
        time.sleep(0.02)
        return real(key, batch)

    monkeypatch.setattr(batcher, "_decode", slowed)
    burst = [[f"s{r}i{i}~{images[(r + i) % len(images)].name}" for i in range(1 + r % 2)] for r in range(40)]
    with ThreadPoolExecutor(len(burst)) as pool:
        answered = list(pool.map(lambda names: check_burst_reply(post(names), names, cli_captions), burst))
    assert len(answered) == len(burst) and sum(answered) >= 1  # each answered right or refused: none lost
    health = httpx.get(f"{server.url}/health").json()
    assert health["queued"] == 0 and health["failed_items"] == 0 and health["loop_errors"] == 0


# --- the loop goes on; a stopped thread is reported -------------------------------------------------

def test_an_error_in_the_loop_is_logged_and_the_loop_goes_on(models, images, cli_captions, monkeypatch, caplog):
    """Bugs injected outside decoding (which has its own one-by-one retry): one while running a
    batch fails that batch's request (500), one while taking a batch fails nothing; both are logged
    with their traceback and the loop goes on."""
    with app_with(models) as app:
        batcher = app.state.batcher
        real_run, real_next = getattr(batcher, "_run", None), batcher._next_batch
        bugs = {"_run": 1, "_next_batch": 0}

        def buggy(name, real):
            def call(*args):
                if bugs[name]:
                    bugs[name] -= 1
                    raise RuntimeError(f"injected bug in {name}")
                return real(*args)
            return call

        monkeypatch.setattr(batcher, "_run", buggy("_run", real_run), raising=False)
        monkeypatch.setattr(batcher, "_next_batch", buggy("_next_batch", real_next))

        async def run():
            async with asgi_client(app) as http:
                failed = await asyncio.wait_for(http.post("/caption", **upload(images[0])), HANG)
                assert failed.status_code == 500 and "injected bug in _run" in failed.json()["error"]
                bugs["_next_batch"] = 1  # the thread's next call to take a batch: before the second of the
                # (at least two: one per decoder) batches below is taken, so counted before they are all answered
                return await all_answered_like_unembed_caption(http, images, cli_captions)

        health = asyncio.run(run())
    assert health["loop_errors"] == 2 and bugs == {"_run": 0, "_next_batch": 0}
    logged = [r for r in caplog.records if "batching loop" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info for r in logged)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end, on purpose
def test_a_stopped_batching_thread_answers_503_and_health_says_so(models, images, monkeypatch):
    with app_with(models) as app:
        batcher = app.state.batcher

        def fatal(key, batch):
            raise SystemExit("injected")  # a BaseException: past every handler, the thread ends

        monkeypatch.setattr(batcher, "_decode", fatal)

        async def run():
            async with asgi_client(app) as http:
                first = await asyncio.wait_for(http.post("/caption", **upload(images[0])), HANG)
                health = await http.get("/health")
                later = await asyncio.wait_for(http.post("/caption", **upload(images[1])), HANG)
                return first, health, later

        first, health, later = asyncio.run(run())
        batcher.thread.join(HANG)
    for reply in (first, health, later):
        assert reply.status_code == 503 and set(reply.json()) == {"error"}, reply.text
        assert "batching thread stopped" in reply.json()["error"] and "SystemExit" in reply.json()["error"]


# --- no wait for a batch that cannot fill; the access log ---------------------------------------------

def test_an_idle_server_starts_at_once_and_batches_form_behind_a_running_one(models, images, cli_captions,
                                                                            monkeypatch, caplog):
    """With the clock stopped (for the batcher), a lone request is decoded all the same: nothing waits
    for a batch to fill. The 5 requests that arrive while it decodes form the next batch. Each
    request's access line names its decoder and the size of the batch it was decoded in."""
    import unembed.batching
    from unembed.serve import ServeConfig

    assert ServeConfig().max_wait_ms == 0
    monkeypatch.setattr(unembed.batching, "time", types.SimpleNamespace(
        monotonic=lambda: 0.0, perf_counter=time.perf_counter, sleep=time.sleep))
    caplog.set_level(logging.INFO, logger="unembed.access")
    with app_with(models, max_batch=8, access_log=True) as app:
        gate = Gate(app.state.batcher, monkeypatch)

        async def run():
            async with asgi_client(app) as http:
                first = asyncio.create_task(http.post("/caption", params={"decoder": "retrieval"},
                                                      **upload(images[0], "gate.png")))
                await until_async(gate.entered.is_set, "a lone request starts")
                behind = [asyncio.create_task(http.post("/caption", **upload(p))) for p in images[1:6]]
                await until_async(lambda: len(queued_items(app.state.batcher)) == 5, "5 requests queue behind it")
                gate.open()
                return await first, await asyncio.gather(*behind)

        first, behind = asyncio.run(run())
        stats = dict(app.state.batcher.stats)
    assert first.status_code == 200 and all(r.status_code == 200 for r in behind)
    assert [r.json()[0]["caption"] for r in behind] == [cli_captions["clipcap"][p.name] for p in images[1:6]]
    assert (stats["batches"], stats["largest_batch"]) == (2, 5)
    lines = [r.getMessage() for r in caplog.records if r.name == "unembed.access"]
    assert len(lines) == 6 and all('"POST /caption' in line and '" 200 ' in line for line in lines)
    assert sum("decoder=retrieval items=1 batch=1" in line for line in lines) == 1
    assert sum("decoder=clipcap items=1 batch=5" in line for line in lines) == 5


@pytest.mark.parametrize("flag, lines", [([], 1), (["--no-access-log"], 0)])
def test_unembed_serve_prints_an_access_line_per_request(models, images, monkeypatch, capsys, flag, lines):
    """`unembed serve` (its server replaced by one request through the app) prints one access line
    on stderr per request, unless --no-access-log."""
    import uvicorn

    import unembed.serve

    def one_request(app, **_):
        async def run():
            async with asgi_client(app) as http:
                assert (await http.post("/caption", **upload(images[0]))).status_code == 200
        asyncio.run(run())
        app.state.batcher.close()

    monkeypatch.setattr(uvicorn, "run", one_request)
    monkeypatch.setattr(unembed.serve, "Models", lambda decoders, device: models)
    logger = logging.getLogger("unembed")
    handlers, level = list(logger.handlers), logger.level
    try:
        assert main(["serve", "--device", "cpu", *flag]) == EXIT_OK
    finally:  # serve() adds its handler and sets the level: undone
        logger.handlers[:] = handlers
        logger.setLevel(level)
    access = [line for line in capsys.readouterr().err.splitlines() if '"POST /caption HTTP/1.1" 200' in line]
    assert len(access) == lines and all("decoder=clipcap items=1 batch=1" in line for line in access)


def test_a_queue_smaller_than_one_request_is_refused_at_start(capsys):
    assert main(["serve", "--max-queue", "3", "--max-images", "4", "--decoder", "nope"]) == EXIT_FAILED
    assert "--max-queue 3 is below --max-images 4" in capsys.readouterr().err


def test_a_wrong_method_keeps_its_allow_header(models):
    with app_with(models) as app:
        async def run():
            async with asgi_client(app) as http:
                return await http.post("/decoders")

        reply = asyncio.run(run())
    assert reply.status_code == 405 and reply.headers["allow"] == "GET" and set(reply.json()) == {"error"}
