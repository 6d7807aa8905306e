"""The OpenAPI contract of `unembed serve`: every request body, query parameter and error it answers.

The handlers read their bodies raw (to hold the size and time limits themselves), so FastAPI cannot
see them; the contract is written here instead and attached to each operation. The query's decoding
options come from the one table (unembed/generation.py) with their types and bounds; each decoder
still refuses what it does not take (422). Errors share one schema, `{"error": "one line"}`.
The example bodies are real: a tiny image in plain-text PPM (so it survives as a JSON string) and
vectors whose float32 bytes are ASCII, so a client or fuzzer built from the document can send them.
"""
from __future__ import annotations

import json
import struct

from unembed.generation import GENERATION_OPTIONS

# query parameter -> decoding option: every option of the table (`sample` is do_sample's name on the wire
# and on the command line)
QUERY_OPTIONS = {("sample" if name == "do_sample" else name): name for name in GENERATION_OPTIONS}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/x-portable-pixmap", "application/octet-stream")
VECTOR_TYPES = ("application/json", "application/octet-stream")
ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERRORS = {
    400: "bad input: not an image, truncated or empty data, a bad multipart body, vectors of the wrong width",
    401: "missing or wrong API key (when the server has one)",
    404: "no decoder of that name on this server",
    408: "the body did not arrive within --read-timeout",
    413: "over a limit: --max-upload-mb, --max-pixels, or --max-images items in one request",
    415: "a body of a type this endpoint does not read",
    422: "a query parameter it does not take, a value out of bounds, or an option the decoder does not take",
    503: "the queue is full (retry after Retry-After seconds) or the batching thread has stopped",
}
# An 8 x 8 red square on white, as plain-text PPM: a real image that is also a valid JSON string.
EXAMPLE_IMAGE = "P3\n8 8\n255\n" + "\n".join(
    " ".join("200 30 30" if 2 <= x < 6 and 2 <= y < 6 else "250 250 245" for x in range(8)) for y in range(8)) + "\n"


def example_vector(dim: int) -> list[float]:
    """0.5 and 2.0 alternate: their float32 bytes (00 00 00 3f, 00 00 00 40) are all ASCII."""
    return [0.5 if i % 2 else 2.0 for i in range(dim)]


def example_safetensors(dim: int) -> str:
    """A one-vector safetensors file (tensor "vectors" [1, dim]) as text: every byte of it is ASCII."""
    header = json.dumps({"vectors": {"dtype": "F32", "shape": [1, dim], "data_offsets": [0, 4 * dim]}})
    header += " " * (-len(header) % 8)
    data = struct.pack(f"<{dim}f", *example_vector(dim))
    return (struct.pack("<Q", len(header)) + header.encode() + data).decode("ascii")


def query_parameters(decoders: list[str]) -> list[dict]:
    """`decoder` (the loaded names) and each decoding option, typed and bounded as the table says."""
    params = [{"name": "decoder", "in": "query", "required": False, "description": "which loaded decoder "
               "(default: the first)", "schema": {"type": "string", "enum": decoders}}]
    for wire, name in QUERY_OPTIONS.items():
        option = GENERATION_OPTIONS[name]
        schema = {"bool": {"type": "boolean"}, "int": {"type": "integer"}, "float": {"type": "number"},
                  "str": {"type": "string"}}[option.type.__name__]
        if option.type is str:
            schema["maxLength"] = int(option.high)
        elif option.type in (int, float):
            schema["maximum"] = option.high
            schema["exclusiveMinimum" if option.low_open else "minimum"] = option.low
        params.append({"name": wire, "in": "query", "required": False, "schema": schema,
                       "description": option.help + ("; only with sample=true" if option.needs_sampling else "")})
    return params


def _responses(ok_description: str, codes) -> dict:
    record = {"type": "object", "required": ["image_id", "caption", "decoder"], "properties": {
        "file": {"type": "string"}, "image_id": {"type": ["string", "integer"]}, "caption": {"type": "string"},
        "decoder": {"type": "string"}, "batch_seconds": {"type": "number"}, "batch_size": {"type": "integer"}}}
    out = {"200": {"description": ok_description,
                   "content": {"application/json": {"schema": {"type": "array", "items": record}}}}}
    for code in codes:
        out[str(code)] = {"description": ERRORS[code], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    out["503"]["headers"] = {"Retry-After": {"description": "seconds, when the queue is full",
                                             "schema": {"type": "integer"}}}
    return out


def caption_operation(decoders: list[str], max_items: int) -> dict:
    """POST /caption: multipart files, or one image as the body (its file name in `name`)."""
    binary = {"type": "string", "format": "binary"}
    content = {"multipart/form-data": {
        "schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": binary, "minItems": 1, "maxItems": max_items}}},
        "examples": {"one image": {"value": {"files": [EXAMPLE_IMAGE]}}}}}
    for media in IMAGE_TYPES:
        content[media] = {"schema": binary}
    content["image/x-portable-pixmap"]["examples"] = {"one image": {"value": EXAMPLE_IMAGE}}
    name = {"name": "name", "in": "query", "required": False, "description": "the file name of an image sent as "
            "the body (its image_id)", "schema": {"type": "string", "maxLength": 255}}
    return {"parameters": [*query_parameters(decoders), name],
            "requestBody": {"required": True, "content": content},
            "responses": _responses("one record per image, in order", (400, 401, 404, 408, 413, 415, 422, 503))}


def embeddings_operation(decoders: list[str], max_items: int, dim: int | None) -> dict:
    """POST /caption/embeddings: vectors as JSON, or a safetensors file as the body."""
    row = {"type": "array", "items": {"type": "number"}}
    if dim:  # every loaded decoder takes one width
        row.update(minItems=dim, maxItems=dim)
    json_body = {"type": "object", "required": ["vectors"], "properties": {
        "vectors": {"type": "array", "items": row, "minItems": 1, "maxItems": max_items},
        "ids": {"type": "array", "items": {"type": "string"}, "description": "one per vector"},
        "embedder_id": {"type": "string", "description": "the embedder that made them (refused if another "
                        "than the decoder's)"}}}
    content = {"application/json": {"schema": json_body},
               "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                            "description": "a safetensors file: one [N, D] tensor, or `unembed "
                                            "embed`'s file (its embedder id is checked)"}}
    if dim:
        content["application/json"]["examples"] = {"one vector": {"value": {"vectors": [example_vector(dim)]}}}
        content["application/octet-stream"]["examples"] = {"one vector": {"value": example_safetensors(dim)}}
    return {"parameters": query_parameters(decoders), "requestBody": {"required": True, "content": content},
            "responses": _responses("one record per vector, in order", (400, 401, 404, 408, 413, 415, 422, 503))}


def health_responses() -> dict:
    return {"503": {"description": "the batching thread has stopped", "content": {"application/json": {
        "schema": ERROR_SCHEMA}}}}
