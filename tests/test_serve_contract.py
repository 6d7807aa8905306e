"""`unembed serve` as a contract: its OpenAPI document describes every body, parameter and error, a
fuzzer built from it (schemathesis, all checks) finds no server error, no undocumented status and no
schema violation, and a client built from the document alone captions an image."""
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from unembed.serve import ServeConfig, create_app

# Valid by the schema yet refused by the method: bytes that are no image, an option this decoder does not
# take, a width the schema cannot tie to the chosen decoder. The examples phase (real bodies) is held to
# 2xx in test_the_documents_examples_are_accepted below.
FUZZ_CONFIG = """
seed = 7
[generation]
max-examples = 12
deterministic = true
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "413", "422"]
[checks.negative_data_rejection]
expected-statuses = ["400", "404", "405", "413", "415", "422"]
"""


@pytest.fixture(scope="module")
def models():
    from unembed.serve import Models

    return Models([], "cpu")  # every bundled decoder, loaded once


@pytest.fixture
def app(models):
    """A fresh app per test: a client that runs the app's lifespan shuts its batcher down at the end."""
    config = ServeConfig(max_batch=8, max_items=4, max_upload_mb=1, max_pixels=1_000_000, read_timeout_s=5)
    return create_app(config, models=models)


@pytest.fixture
def api(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_str(FUZZ_CONFIG))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_server_keeps_its_contract_under_fuzzing(api, mode):
    """Every operation, schema-valid requests and schema-violating ones, with all of schemathesis'
    checks (server errors, undocumented statuses and headers, response schemas, negative data
    rejected, 405s with Allow...)."""
    from hypothesis import given
    from schemathesis import GenerationMode

    calls = []
    for found in api.get_all_operations():
        operation = found.ok()
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # GET /decoders and /health take nothing that could be sent wrong

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            calls.append(case.call_and_validate().status_code)

        check()
    assert len(calls) >= 20 and all(code < 500 for code in calls)


def test_the_document_describes_bodies_parameters_and_errors(app):
    from fastapi.testclient import TestClient

    doc = TestClient(app).get("/openapi.json").json()
    caption = doc["paths"]["/caption"]["post"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "application/octet-stream"} <= set(
        caption["requestBody"]["content"])
    params = {p["name"]: p["schema"] for p in caption["parameters"]}
    assert params["num_beams"] == {"type": "integer", "minimum": 1, "maximum": 16}
    assert params["top_p"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert params["decoder"]["enum"][0] == "clipcap" and len(params["decoder"]["enum"]) == 7
    for path in ("/caption", "/caption/embeddings"):
        assert {"200", "400", "401", "404", "408", "413", "415", "422", "503"} <= set(doc["paths"][path]["post"]["responses"])
    vectors = doc["paths"]["/caption/embeddings"]["post"]
    assert "coca" not in {p["name"]: p for p in vectors["parameters"]}["decoder"]["schema"]["enum"]  # it needs tokens


def test_the_documents_examples_are_accepted_by_a_client_built_from_it(app):
    """A client that knows only /openapi.json: for each operation with a body it sends the document's
    example in each media type that has one (multipart built from the schema's field name) and must
    get captions back."""
    from fastapi.testclient import TestClient

    client = TestClient(app)
    doc = client.get("/openapi.json").json()
    answered = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            for media, body in op.get("requestBody", {}).get("content", {}).items():
                for example in body.get("examples", {}).values():
                    value = example["value"]
                    if media == "multipart/form-data":
                        (field,) = body["schema"]["required"]
                        files = [(field, (f"example-{i}", item.encode(), "application/octet-stream"))
                                 for i, item in enumerate(value[field])]
                        response = client.request(method, path, files=files)
                    elif media == "application/json":
                        response = client.request(method, path, json=value)
                    else:
                        response = client.request(method, path, content=value.encode(),
                                                  headers={"content-type": media})
                    assert response.status_code == 200, (path, media, response.text)
                    records = response.json()
                    assert len(records) == 1 and records[0]["caption"], records
                    answered.append((path, media))
    assert sorted(answered) == [("/caption", "image/x-portable-pixmap"), ("/caption", "multipart/form-data"),
                                ("/caption/embeddings", "application/json"),
                                ("/caption/embeddings", "application/octet-stream")]


def test_vectors_from_another_embedder_are_refused_as_the_cli_refuses_them(app):
    from fastapi.testclient import TestClient

    client = TestClient(app)
    dim = app.state.models.decoders["clipcap"][0].config.embed_dim
    own = app.state.models.decoders["clipcap"][0].config.embedder_id
    vectors = [[0.1] * dim]
    assert client.post("/caption/embeddings", json={"vectors": vectors, "embedder_id": own}).status_code == 200
    assert client.post("/caption/embeddings", json={"vectors": vectors}).status_code == 200  # unsaid: width only
    other = client.post("/caption/embeddings", json={"vectors": vectors, "embedder_id": "ViT-B-32:openai"})
    assert other.status_code == 400 and "made by embedder 'ViT-B-32:openai'" in other.json()["error"]
