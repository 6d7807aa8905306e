"""`unembed serve`: the captioning service (unembed/serve.py) on a port."""
from __future__ import annotations

import argparse

from unembed.cli.common import EXIT_OK, log
from unembed.data import MAX_PIXELS


def cmd_serve(args) -> int:
    from unembed.serve import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, access_log=args.access_log, max_upload_mb=args.max_upload_mb,
                         max_items=args.max_images, max_pixels=args.max_pixels, read_timeout_s=args.read_timeout,
                         workers=args.workers, api_key=args.api_key or "", device=args.device)
    serve(config, args.decoder or [], log=log)
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("serve", help="caption over HTTP, batching concurrent requests (page at /, API docs at /docs)")
    p.add_argument("--decoder", action="append", help="a decoder directory, bundled decoder name or hf-hub:... "
                   "(repeat for several; default: every bundled decoder, the bundle's default first)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="items decoded together at most")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long the first item of a batch waits for it to fill (default 0: an idle server starts "
                        "at once; batches form from the requests that arrive while one is decoded)")
    p.add_argument("--max-queue", type=int, help="items waiting at most; a request past it gets 503 and Retry-After "
                   "(default: 4 x --max-batch, at least --max-images)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr, with the decoder and the batch sizes (default: on)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-images", type=int, default=16, help="images (or vectors) per request")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest image, in pixels (the limit of every "
                   "command)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a client has to send its body")
    p.add_argument("--workers", type=int, default=4, help="threads decoding uploaded images")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set $UNEMBED_API_KEY)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)
