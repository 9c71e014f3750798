"""A bounded property-based run over the server's own OpenAPI schema (schemathesis, against the ASGI app):
whatever a client sends, valid by the schema or not, no answer is a 5xx and none contradicts the schema
(status code, content type, body, headers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.http.app import create_app
from service.http.schemas import SampleRequest
from service.settings import Settings

SERVED = ["solo", "digits", "gan", "nice"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
RUN = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is a regression, not bad luck
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """The app with tiny models of every family, started (lifespan run), and its schema as it publishes it.

    Limits are small so that requests the schema allows and the server accepts finish in milliseconds.
    """
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors", steps=5)
    write_tiny_eqm(models / "digits.safetensors")
    write_tiny_gan(models / "gan.safetensors")
    write_tiny_flow(models / "nice.safetensors")
    app = create_app(
        Settings(models_dir=models, state_dir=Path(root / "state"), device="cpu", max_n=3, max_steps=12, max_frames=4)
    )
    with TestClient(app):  # runs the lifespan: models loaded, worker started; stopped on exit
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_get_endpoint_answers_as_documented(schema: schemathesis.BaseSchema) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/models"):  # no parameters: one call each says it all
        schema[path]["GET"].Case().call_and_validate(checks=CHECKS)


def test_sample_answers_match_the_schema_for_valid_bodies(schema: schemathesis.BaseSchema) -> None:
    """Bodies the schema allows; most name a served model and keep a few of the other fields, so that many
    really sample (random combinations of every field are mostly fields that do not apply: a 422)."""
    operation = schema["/sample"]["POST"]
    fields = sorted(SampleRequest.model_fields)

    @RUN
    @given(
        case=operation.as_strategy(),
        model=st.sampled_from([*SERVED, None]),
        keep=st.sets(st.sampled_from(fields)),
        answer=st.sampled_from([{}, {"format": "json"}, {"format": "gif"}, {"stream": True}]),
    )
    def call(case, model: str | None, keep: set[str], answer: dict) -> None:
        if model is not None and isinstance(case.body, dict):
            kept = {name: value for name, value in case.body.items() if name in keep}
            case.body = kept | answer | {"model": model}
        case.call_and_validate(checks=CHECKS)

    call()


def test_sample_rejects_bodies_the_schema_forbids_with_a_4xx(schema: schemathesis.BaseSchema) -> None:
    operation = schema["/sample"]["POST"]

    @RUN
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
    def call(case) -> None:
        case.call_and_validate(checks=[*CHECKS, negative_data_rejection])

    call()
