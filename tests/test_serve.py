"""`unembed serve`: a real uvicorn server on loopback, driven over HTTP (httpx), with the bundle's
models. Captions must equal `unembed caption`'s for the same images, under concurrency and dynamic
batching; bad input gets a 4xx with one JSON error; the server stays healthy under load."""
import contextlib
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from unembed.cli import EXIT_OK, main

DECODERS = ["clipcap", "retrieval"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(options: list[str], cwd, env):
    """`unembed serve OPTIONS` as a user starts it (a process of its own, on a free loopback port):
    yields its URL once /health answers; stopped with SIGTERM after."""
    import signal
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "unembed.cli", "serve", "--port", str(port), *options], cwd=cwd,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)


class Server:
    """uvicorn serving create_app(config) in a thread, on a free loopback port."""

    def __init__(self, decoders=tuple(DECODERS), **options):
        import uvicorn

        from unembed.serve import ServeConfig, create_app

        self.config = ServeConfig(port=free_port(), device="cpu", **options)
        self.app = create_app(self.config, decoders=list(decoders))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.config.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.config.port}"
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server(max_batch=8, max_wait_ms=50, max_items=4, max_upload_mb=1, max_pixels=1_000_000, read_timeout_s=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def images(scenes_dir):
    return sorted((scenes_dir / "test" / "images").glob("*.png"))[:12]


@pytest.fixture(scope="module")
def cli_captions(images, tmp_path_factory):
    """What `unembed caption` prints for each image, per decoder."""
    out, found = tmp_path_factory.mktemp("cli"), {}
    for name in DECODERS:
        path = out / f"{name}.jsonl"
        assert main(["caption", *map(str, images), "--decoder", name, "--out", str(path), "--device", "cpu"]) == EXIT_OK
        found[name] = {Path(r["file"]).name: r["caption"] for r in map(json.loads, path.read_text().splitlines())}
    assert len(set(found["clipcap"].values())) > 3  # the images differ, so a mix-up would show
    return found


def post_image(url, path, decoder=None, **params):
    query = {**({"decoder": decoder} if decoder else {}), **params}
    return httpx.post(f"{url}/caption", params=query, files={"file": (path.name, path.read_bytes(), "image/png")},
                      timeout=60)


def test_concurrent_requests_are_batched_and_each_gets_its_own_caption(server, images, cli_captions):
    before = httpx.get(f"{server.url}/health").json()
    jobs = [(p, d) for d in DECODERS for p in images]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: post_image(server.url, job[0], job[1]), jobs))
    for (path, decoder), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        (record,) = response.json()
        assert record["caption"] == cli_captions[decoder][path.name], (decoder, path.name)
        assert record["file"] == path.name and set(record) == {"file", "image_id", "caption", "decoder", "batch_seconds",
                                                                   "batch_size"}
    after = httpx.get(f"{server.url}/health").json()
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < len(jobs)


def test_edits_over_serve_write_what_the_cli_writes(server, images, cli_captions, tmp_path):
    """The bundled clipcap keeps its substitutes.json: `edits=1&margin=0` in the query gives the caption
    `unembed caption --edits 1 --margin 0` gives for the same file (no margin, so some caption changes)."""
    path = tmp_path / "edited.jsonl"
    assert main(["caption", *map(str, images), "--decoder", "clipcap", "--edits", "1", "--margin", "0", "--out",
                 str(path), "--device", "cpu"]) == EXIT_OK
    expected = {Path(r["file"]).name: r["caption"] for r in map(json.loads, path.read_text().splitlines())}
    assert expected != cli_captions["clipcap"]  # the edits changed something, so ignoring them would show
    for image in images:
        response = post_image(server.url, image, "clipcap", edits="1", margin="0")
        assert response.status_code == 200 and response.json()[0]["caption"] == expected[image.name], response.text


def test_multipart_with_several_images_and_a_raw_body(server, images, cli_captions):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images[:3]]
    records = httpx.post(f"{server.url}/caption", files=files, timeout=60).json()
    assert [r["caption"] for r in records] == [cli_captions["clipcap"][p.name] for p in images[:3]]
    raw = httpx.post(f"{server.url}/caption", params={"name": images[3].name}, content=images[3].read_bytes(),
                     headers={"content-type": "image/png"}, timeout=60)
    assert raw.json()[0]["caption"] == cli_captions["clipcap"][images[3].name]


def test_embeddings_endpoint_captions_vectors(server, images, embedder_dir):
    from unembed.bundle import bundled_decoder
    from unembed.data.images import load_image
    from unembed.decoders import load_decoder
    from unembed.embedders import load_embedder

    decoder = load_decoder(bundled_decoder("clipcap"))
    embedder = load_embedder(decoder.config.embedder_spec if Path(decoder.config.embedder_spec).exists()
                             else str(bundled_decoder("clipcap").parent / "embedder"), "cpu")
    embedded = embedder.embed([load_image(p) for p in images[:2]], ["a", "b"])
    expected = decoder.decode(embedded)
    as_json = httpx.post(f"{server.url}/caption/embeddings", json={"vectors": embedded.vectors.tolist(), "ids": ["a", "b"]},
                         timeout=60)
    assert [r["caption"] for r in as_json.json()] == expected and [r["image_id"] for r in as_json.json()] == ["a", "b"]
    from safetensors.torch import save

    as_bytes = httpx.post(f"{server.url}/caption/embeddings", content=save({"vectors": embedded.vectors}),
                          headers={"content-type": "application/octet-stream"}, timeout=60)
    assert [r["caption"] for r in as_bytes.json()] == expected


def png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height (a decompression bomb needs no pixels to be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("what, request_kwargs, status, says", [
    ("not an image", dict(files={"file": ("a.png", b"hello", "image/png")}), 400, "not an image"),
    ("zero bytes", dict(files={"file": ("a.png", b"", "image/png")}), 400, "empty"),
    ("a decompression bomb", dict(files={"file": ("bomb.png", png(30000, 30000), "image/png")}), 413, "limit"),
    ("too many images", dict(files=[("f", (f"{i}.png", png(2, 2), "image/png")) for i in range(5)]), 413, "limit of 4"),
    ("too large a body", dict(content=b"x" * (2 ** 20 + 1), headers={"content-type": "image/png"}), 413, "limit"),
    ("unknown decoder", dict(params={"decoder": "nope"}, files={"file": ("a.png", png(2, 2), "image/png")}), 404,
     "unknown decoder"),
    ("an empty decoder name", dict(params={"decoder": ""}, files={"file": ("a.png", png(2, 2), "image/png")}), 404,
     "unknown decoder ''"),
    ("too long a name", dict(params={"name": "n" * 256}, files={"file": ("a.png", png(2, 2), "image/png")}), 422,
     "name must be a text of at most 255 characters"),
    ("bad option", dict(params={"num_beams": "many"}, files={"file": ("a.png", png(2, 2), "image/png")}), 422,
     "num_beams must be an integer"),
    ("option out of range", dict(params={"max_length": "100000"}, files={"file": ("a.png", png(2, 2), "image/png")}),
     422, "option max_length: the clipcap decoder takes an integer in [1, 128], got 100000"),
    ("edits without substitutes", dict(params={"edits": "1", "decoder": "retrieval"},
                                       files={"file": ("a.png", png(2, 2), "image/png")}), 422,
     "option edits: this retrieval decoder has no word substitutes"),
    ("unknown option", dict(params={"foo": "1"}, files={"file": ("a.png", png(2, 2), "image/png")}), 422,
     "unknown query parameter 'foo'"),
    ("a body of another type", dict(content=b"{}", headers={"content-type": "application/json"}), 415,
     "cannot read a body of type 'application/json'"),
])
def test_bad_requests_get_one_json_error(server, what, request_kwargs, status, says):
    response = httpx.post(f"{server.url}/caption", timeout=60, **request_kwargs)
    assert response.status_code == status, (what, response.text)
    assert set(response.json()) == {"error"} and says in response.json()["error"], (what, response.json())


def test_unknown_paths_and_methods_get_one_json_error(server):
    missing = httpx.get(f"{server.url}/nope")
    wrong = httpx.post(f"{server.url}/decoders")
    assert (missing.status_code, wrong.status_code) == (404, 405)
    assert set(missing.json()) == {"error"} and "/nope" in missing.json()["error"]
    assert set(wrong.json()) == {"error"} and "Method Not Allowed" in wrong.json()["error"]


def test_truncated_image_and_wrong_vector_width(server, images):
    data = images[0].read_bytes()
    response = httpx.post(f"{server.url}/caption", files={"file": ("cut.png", data[:len(data) // 2], "image/png")},
                          timeout=60)
    assert response.status_code == 400 and "truncated" in response.json()["error"]
    wrong = httpx.post(f"{server.url}/caption/embeddings", json={"vectors": [[0.1, 0.2, 0.3]]}, timeout=60)
    assert wrong.status_code == 400 and "3-d" in wrong.json()["error"]


def test_a_slow_client_times_out_without_blocking_others(server, images, cli_captions):
    with socket.create_connection(("127.0.0.1", server.config.port)) as slow:
        slow.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
        fast = post_image(server.url, images[0])  # answered while the slow body is pending
        assert fast.status_code == 200 and fast.json()[0]["caption"] == cli_captions["clipcap"][images[0].name]
        slow.settimeout(10)
        reply = b""
        while b"did not arrive" not in reply:  # headers and body may come in separate packets
            chunk = slow.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408")


def test_decoders_health_and_page(server):
    decoders = httpx.get(f"{server.url}/decoders").json()
    assert [d["name"] for d in decoders] == DECODERS and decoders[0]["default"]
    assert {d["kind"] for d in decoders} == {"clipcap", "retrieval"} and all(d["embedder_id"] for d in decoders)
    assert all(d["knows"].startswith("the scenes world only") for d in decoders)  # bundled: they say so
    assert not any("/" in str(value) for d in decoders for value in d.values())  # no folder of this machine
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    page = httpx.get(f"{server.url}/").text
    assert "<script>" in page and "http" not in page.split("<script>")[1].split("fetch(")[0].lower().replace(
        "https", "")  # no external assets
    assert httpx.get(f"{server.url}/openapi.json").json()["paths"]["/caption"]


def test_load_16_clients_by_25_mixed_requests(server, images, cli_captions):
    """16 concurrent clients x 25 requests, good and bad images mixed: no response lost or mixed up."""
    bad = [b"", b"garbage", png(30000, 30000)]

    def client(c):
        results = []
        with httpx.Client(timeout=120) as http:
            for r in range(25):
                if (c + r) % 4 == 3:
                    body = bad[(c + r) % 3]
                    response = http.post(f"{server.url}/caption", files={"file": ("bad.png", body, "image/png")})
                    results.append(("bad", response.status_code, None))
                else:
                    path = images[(c * 25 + r) % len(images)]
                    response = http.post(f"{server.url}/caption", files={"file": (path.name, path.read_bytes(),
                                                                                 "image/png")})
                    results.append((path.name, response.status_code, response.json()[0]["caption"]
                                    if response.status_code == 200 else response.text))
        return results

    with ThreadPoolExecutor(16) as pool:
        outcomes = [o for results in pool.map(client, range(16)) for o in results]
    assert len(outcomes) == 400
    for name, status, caption in outcomes:
        if name == "bad":
            assert 400 <= status < 500
        else:
            assert status == 200 and caption == cli_captions["clipcap"][name], (name, status, caption)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_api_key_is_required_when_set(images):
    s = Server(api_key="sesame")
    try:
        assert httpx.post(f"{s.url}/caption", files={"file": ("a.png", png(2, 2))}).status_code == 401
        assert httpx.get(f"{s.url}/decoders").status_code == 401
        ok = httpx.post(f"{s.url}/caption", headers={"Authorization": "Bearer sesame"},
                        files={"file": (images[0].name, images[0].read_bytes(), "image/png")}, timeout=60)
        assert ok.status_code == 200 and httpx.get(f"{s.url}/health").status_code == 200
    finally:
        s.stop()


def test_a_failing_batch_fails_only_its_own_request(server, images, cli_captions, monkeypatch):
    """A decode error for one item (here: an injected one for a chosen image) answers that request
    with a 500 naming it; the requests batched with it get their captions."""
    from unembed.serve import Batcher

    real = Batcher._decode

    def failing(self, key, batch):
        if any(item.record["file"] == "poison.png" for item in batch):
            raise RuntimeError("injected failure")
        return real(self, key, batch)

    monkeypatch.setattr(Batcher, "_decode", failing)
    jobs = [("poison.png", images[0].read_bytes())] + [(p.name, p.read_bytes()) for p in images[1:6]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda j: httpx.post(f"{server.url}/caption", files={"file": (j[0], j[1], "image/png")},
                                                       timeout=60), jobs))
    assert responses[0].status_code == 500 and "injected failure" in responses[0].json()["error"]
    for (name, _), response in zip(jobs[1:], responses[1:]):
        assert response.status_code == 200 and response.json()[0]["caption"] == cli_captions["clipcap"][name]


def test_page_in_a_browser_uploads_an_image_and_shows_every_decoders_caption(server, images, cli_captions, tmp_path):
    """Headless chromium opens the page, which posts an image through the same path as a drop
    (#try=URL fetches it from the server) and shows each decoder's caption."""
    from tests.test_report import BROWSERS, Dom, headless
    import os
    import shutil

    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    if browser is None:
        if os.environ.get("UNEMBED_REQUIRE_BROWSER") == "1":
            pytest.fail("UNEMBED_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("no chromium on PATH")
    markup = headless(browser, tmp_path / "profile", "--dump-dom", f"{server.url}/#try=/health")
    assert "image-row" in markup and "error" in markup  # /health is not an image: the page shows the error
    image_url = f"/examples-for-test/{images[0].name}"
    from starlette.staticfiles import StaticFiles

    if not any(getattr(r, "path", "") == "/examples-for-test" for r in server.app.routes):
        server.app.mount("/examples-for-test", StaticFiles(directory=images[0].parent))
    markup = headless(browser, tmp_path / "profile2", "--dump-dom", f"{server.url}/#try={image_url}")
    captions = {a.get("data-decoder") for t, a in Dom(markup).elements if t == "td" and a.get("class") == "caption"}
    assert captions == set(DECODERS), markup[-2000:]
    for name in DECODERS:
        assert cli_captions[name][images[0].name] in markup


@pytest.mark.slow(seconds=18)
def test_readme_serve_commands_answer_like_unembed_caption_and_stop_on_sigterm(tmp_path):
    """The README's block: the server in the background, then its curl lines; each answer equals what
    `unembed caption` prints with the same options. SIGTERM then stops the server once the request
    in flight is answered."""
    import shlex
    import signal
    import subprocess
    import sys

    from tests.test_readme import ROOT, block

    port = str(free_port())
    lines = [line.replace("8000", port) for line in block("serve").splitlines() if line.strip()]
    assert lines[0].endswith("&") and all(line.startswith("curl ") for line in lines[1:])
    server = subprocess.Popen([sys.executable, "-m", "unembed.cli", *shlex.split(lines[0][:-1])[1:]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "the README's server did not start"
                time.sleep(0.2)
        for line in lines[1:]:
            argv = shlex.split(line)
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
            (record,) = json.loads(done.stdout)
            query = dict(p.split("=") for p in argv[-1].partition("?")[2].split("&") if p)
            image = ROOT / argv[argv.index("-F") + 1].split("@")[1]
            options = ["--decoder", query.get("decoder", "clipcap")] + (
                ["--num-beams", query["num_beams"]] if "num_beams" in query else [])
            out = tmp_path / "cli.jsonl"
            assert main(["caption", str(image), *options, "--out", str(out), "--device", "cpu"]) == EXIT_OK
            assert record["caption"] == json.loads(out.read_text())["caption"] and record["file"] == image.name
        # SIGTERM while a request is in flight (its body half sent): the request still gets its caption.
        image = (ROOT / "examples" / "scene-0.png").read_bytes()
        head = (f"POST /caption?name=scene-0.png HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(image)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", int(port))) as pending:
            pending.sendall(head + image[:100])
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            pending.sendall(image[100:])
            pending.settimeout(60)
            reply = b""
            while chunk := pending.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])[0]["caption"]
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM: the exit status says it was terminated
    assert code == -signal.SIGTERM


def test_a_decoder_that_cannot_load_stops_serve_with_one_line(capsys, tmp_path):
    from unembed.cli import EXIT_FAILED

    assert main(["serve", "--decoder", str(tmp_path / "missing"), "--port", str(free_port())]) == EXIT_FAILED
    assert main(["serve", "--decoder", "nope", "--port", str(free_port())]) == EXIT_FAILED
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "missing" in lines[0] and "no decoder 'nope'" in lines[1]
