"""docs/openapi.yaml declares exactly the routes, parameters and request bodies the handlers' resolvers
declare (Powertools' generated OpenAPI, scripts/openapi.py), and the comparison catches drift either way."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from openapi_spec_validator import validate as validate_openapi

from scripts.openapi import committed_document, drift, generated_document, main

Document = dict[str, Any]


@pytest.fixture(scope="module")
def generated() -> Document:
    return generated_document()


@pytest.fixture
def committed() -> Document:
    return committed_document()


def test_the_committed_document_declares_what_the_resolvers_declare(generated: Document, committed: Document) -> None:
    assert drift(generated, committed) == []


def test_the_generated_document_is_valid_openapi_with_every_api_route(generated: Document) -> None:
    validate_openapi(generated)
    routes = {(method.upper(), path) for path, item in generated["paths"].items() for method in item}
    assert routes == {
        ("POST", "/sonos/oauth/initiate"),
        ("GET", "/sonos/oauth/callback"),
        ("GET", "/sonos/token"),
        ("DELETE", "/sonos/token"),
    }


def _parameter(document: Document, method: str, path: str, name: str) -> dict[str, Any]:
    for parameter in document["paths"][path][method]["parameters"]:
        if "$ref" in parameter:
            continue
        if parameter["name"] == name:
            found: dict[str, Any] = parameter
            return found
    raise KeyError(name)


def _rename_revoke_user_query(document: Document) -> None:
    _parameter(document, "delete", "/sonos/token", "userId")["name"] = "user_id"


def _drop_callback_route(document: Document) -> None:
    del document["paths"]["/sonos/oauth/callback"]


def _add_a_route(document: Document) -> None:
    document["paths"]["/sonos/token"]["put"] = {"responses": {"200": {"description": "never served"}}}


def _require_the_callback_state(document: Document) -> None:
    _parameter(document, "get", "/sonos/oauth/callback", "state")["required"] = True


def _loosen_the_fetch_user_limit(document: Document) -> None:
    # The committed fetch parameters point at shared components: replace one with its own copy.
    document["paths"]["/sonos/token"]["get"]["parameters"][0] = {
        "name": "userId",
        "in": "query",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 512},
    }


def _drop_initiate_redirect_uri(document: Document) -> None:
    del document["components"]["schemas"]["InitiateRequest"]["properties"]["redirectUri"]


def _make_the_redirect_uri_not_nullable(document: Document) -> None:
    del document["components"]["schemas"]["InitiateRequest"]["properties"]["redirectUri"]["nullable"]


def _make_the_revoke_body_required(document: Document) -> None:
    document["paths"]["/sonos/token"]["delete"]["requestBody"]["required"] = True


def _give_fetch_a_body(document: Document) -> None:
    document["paths"]["/sonos/token"]["get"]["requestBody"] = {
        "content": {"application/json": {"schema": {"type": "object"}}}
    }


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            _rename_revoke_user_query,
            [
                "DELETE /sonos/token: parameter query userId declared by the code, missing from the document",
                "DELETE /sonos/token: parameter query user_id in the document, not declared by the code",
            ],
        ),
        (_drop_callback_route, ["GET /sonos/oauth/callback: declared by the code, missing from the document"]),
        (_add_a_route, ["PUT /sonos/token: in the document, not declared by the code"]),
        (
            _require_the_callback_state,
            ["GET /sonos/oauth/callback: parameter query state: required is False in the code, True in the document"],
        ),
        (
            _loosen_the_fetch_user_limit,
            ["GET /sonos/token: parameter query userId: maxLength is 256 in the code, 512 in the document"],
        ),
        (
            _drop_initiate_redirect_uri,
            [
                "POST /sonos/oauth/initiate: request body application/json: property redirectUri"
                " declared by the code, missing from the document"
            ],
        ),
        (
            _make_the_redirect_uri_not_nullable,
            [
                "POST /sonos/oauth/initiate: request body application/json: property redirectUri:"
                " nullable is True in the code, False in the document"
            ],
        ),
        (
            _make_the_revoke_body_required,
            ["DELETE /sonos/token: request body: required is False in the code, True in the document"],
        ),
        (_give_fetch_a_body, ["GET /sonos/token: request body in the document, not declared by the code"]),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_a_document_drifted_from_the_code_is_caught(
    generated: Document, committed: Document, change: Callable[[Document], None], expected: list[str]
) -> None:
    drifted = copy.deepcopy(committed)
    change(drifted)
    assert drift(generated, drifted) == expected


def test_code_declaring_a_parameter_the_document_lacks_is_caught(generated: Document, committed: Document) -> None:
    code = copy.deepcopy(generated)
    code["paths"]["/sonos/token"]["get"]["parameters"].append(
        {"name": "scope", "in": "query", "required": False, "schema": {"type": "string"}}
    )
    assert drift(code, committed) == [
        "GET /sonos/token: parameter query scope declared by the code, missing from the document"
    ]


def test_check_exits_non_zero_listing_the_drift(
    committed: Document, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    in_step = tmp_path / "in_step.yaml"
    in_step.write_text(yaml.safe_dump(committed))
    assert main(["--check", "--document", str(in_step)]) == 0

    drifted = copy.deepcopy(committed)
    _rename_revoke_user_query(drifted)
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump(drifted))
    capsys.readouterr()
    assert main(["--check", "--document", str(renamed)]) == 1
    printed = capsys.readouterr().out
    assert "parameter query user_id in the document, not declared by the code" in printed
    assert "has drifted from the handlers' resolvers (2 differences)" in printed


def test_without_check_it_prints_the_generated_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed["paths"]) == {"/sonos/oauth/initiate", "/sonos/oauth/callback", "/sonos/token"}
