"""The REST API as the handlers' resolvers declare it (Powertools' OpenAPI), and its drift from docs/openapi.yaml.

    .venv/bin/python scripts/openapi.py            # print the generated document (YAML)
    .venv/bin/python scripts/openapi.py --check    # exit 1, listing the differences, on drift

Each API handler (functions/<name>/app.py) is loaded by path and its ``edge.ApiRoutes``
built into Powertools' resolver: no settings, AWS or services are needed for that.
Powertools emits each resolver's schema; the paths are merged into one document.

The committed document is hand-completed (security, every answer, the error body); the
code is the truth for the routes, their parameters and request bodies. ``--check``
compares those: paths and methods, each parameter (name, in, required) and request
body (required, media types) in both directions, and the schema facts the resolver
knows (type, minLength, maxLength, pattern, an object's properties, required fields
and nullability). A limit the resolver leaves unsaid may be documented: the layer
enforces it behind the resolver (e.g. the callback's code and state lengths).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import yaml  # type: ignore[import-untyped,unused-ignore]

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT / "layers" / "token_manager") not in sys.path:
    sys.path.insert(0, str(ROOT / "layers" / "token_manager"))

DOCUMENT: Final = ROOT / "docs" / "openapi.yaml"
API_FUNCTIONS: Final = ("oauth_initiate", "oauth_callback", "token_fetch", "token_revoke")
HTTP_METHODS: Final = frozenset({"get", "put", "post", "delete", "patch", "head", "options"})
# Schema facts compared wherever the resolver states them.
_LIMITS: Final = ("type", "minLength", "maxLength", "pattern")

Resolve = Callable[[Mapping[str, Any]], Mapping[str, Any]]


# --------------------------------------------------------------------------- generate


def load_api_function(name: str) -> ModuleType:
    """``functions/<name>/app.py`` under a module name of its own (every handler file is ``app.py``)."""
    path = ROOT / "functions" / name / "app.py"
    spec = importlib.util.spec_from_file_location(f"openapi_{name}_app", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_document() -> dict[str, Any]:
    """One OpenAPI document (Powertools' 3.1) holding every API handler's declared routes."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    openapi_version = ""
    for name in API_FUNCTIONS:
        resolver = load_api_function(name).api.resolver()
        part: dict[str, Any] = json.loads(resolver.get_openapi_json_schema(title=name, version="generated"))
        openapi_version = part["openapi"]
        for path, item in part.get("paths", {}).items():
            merged = paths.setdefault(path, {})
            for method, operation in item.items():
                if method in merged:
                    raise ValueError(f"{method.upper()} {path} is declared by two handlers")
                merged[method] = operation
        for schema_name, schema in part.get("components", {}).get("schemas", {}).items():
            if schemas.setdefault(schema_name, schema) != schema:
                raise ValueError(f"two handlers declare different schemas named {schema_name}")
    return {
        "openapi": openapi_version,
        "info": {"title": "Sonos token service (generated from the handlers' resolvers)", "version": "generated"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def committed_document(path: Path = DOCUMENT) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not an OpenAPI document")
    return loaded


# --------------------------------------------------------------------------- compare


def drift(generated: Mapping[str, Any], committed: Mapping[str, Any]) -> list[str]:
    """Where ``committed`` disagrees with what the resolvers declare (``generated``); empty when in step."""
    code, doc = _operations(generated), _operations(committed)
    resolve_code, resolve_doc = _resolver_of(generated), _resolver_of(committed)
    problems = [f"{where}: declared by the code, missing from the document" for where in sorted(code.keys() - doc)]
    problems += [f"{where}: in the document, not declared by the code" for where in sorted(doc.keys() - code)]
    for where in sorted(code.keys() & doc):
        problems += _parameter_drift(where, code[where], doc[where], resolve_code, resolve_doc)
        problems += _body_drift(where, code[where], doc[where], resolve_code, resolve_doc)
    return problems


def _operations(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def _resolver_of(document: Mapping[str, Any]) -> Resolve:
    """Follows local ``$ref``s (``#/components/...``) until the node is no reference."""

    def resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
        seen: set[str] = set()
        while "$ref" in node:
            ref = str(node["$ref"])
            if not ref.startswith("#/") or ref in seen:
                raise ValueError(f"cannot follow $ref {ref}")
            seen.add(ref)
            target: Any = document
            for part in ref[2:].split("/"):
                target = target[part]
            node = target
        return node

    return resolve


def _parameter_drift(
    where: str, code: Mapping[str, Any], doc: Mapping[str, Any], resolve_code: Resolve, resolve_doc: Resolve
) -> list[str]:
    code_params = _parameters(code, resolve_code)
    doc_params = _parameters(doc, resolve_doc)
    problems = [
        f"{where}: parameter {key} declared by the code, missing from the document"
        for key in sorted(code_params.keys() - doc_params)
    ]
    problems += [
        f"{where}: parameter {key} in the document, not declared by the code"
        for key in sorted(doc_params.keys() - code_params)
    ]
    for key in sorted(code_params.keys() & doc_params):
        code_param, doc_param = code_params[key], doc_params[key]
        if bool(code_param.get("required")) != bool(doc_param.get("required")):
            problems.append(
                f"{where}: parameter {key}: required is {bool(code_param.get('required'))} in the code, "
                f"{bool(doc_param.get('required'))} in the document"
            )
        problems += _schema_drift(
            f"{where}: parameter {key}",
            _facts(code_param.get("schema", {}), resolve_code),
            _facts(doc_param.get("schema", {}), resolve_doc),
            with_nullable=False,  # a query value is text or absent: null means nothing there
        )
    return problems


def _parameters(operation: Mapping[str, Any], resolve: Resolve) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for reference in operation.get("parameters", []):
        parameter = resolve(reference)
        found[f"{parameter['in']} {parameter['name']}"] = parameter
    return found


def _body_drift(
    where: str, code: Mapping[str, Any], doc: Mapping[str, Any], resolve_code: Resolve, resolve_doc: Resolve
) -> list[str]:
    code_body = resolve_code(code["requestBody"]) if "requestBody" in code else None
    doc_body = resolve_doc(doc["requestBody"]) if "requestBody" in doc else None
    if code_body is None and doc_body is None:
        return []
    if code_body is None:
        return [f"{where}: request body in the document, not declared by the code"]
    if doc_body is None:
        return [f"{where}: request body declared by the code, missing from the document"]
    problems: list[str] = []
    if bool(code_body.get("required")) != bool(doc_body.get("required")):
        problems.append(
            f"{where}: request body: required is {bool(code_body.get('required'))} in the code, "
            f"{bool(doc_body.get('required'))} in the document"
        )
    code_media, doc_media = code_body.get("content", {}), doc_body.get("content", {})
    if set(code_media) != set(doc_media):
        problems.append(
            f"{where}: request body media types are {sorted(code_media)} in the code, "
            f"{sorted(doc_media)} in the document"
        )
    for media_type in sorted(set(code_media) & set(doc_media)):
        problems += _schema_drift(
            f"{where}: request body {media_type}",
            _facts(code_media[media_type].get("schema", {}), resolve_code),
            _facts(doc_media[media_type].get("schema", {}), resolve_doc),
            with_nullable=False,  # an absent body is the request body's `required`, not the schema's
        )
    return problems


def _facts(schema: Mapping[str, Any], resolve: Resolve) -> dict[str, Any]:
    """A schema's comparable facts, written the same way for OpenAPI 3.0 and 3.1.

    ``$ref`` and ``allOf`` are merged in; a 3.1 ``anyOf`` with ``{"type": "null"}`` and a
    3.0 ``nullable: true`` both become ``nullable``.
    """
    schema = resolve(schema)
    facts: dict[str, Any] = {"nullable": bool(schema.get("nullable"))}
    for part in schema.get("allOf", []):
        inner = _facts(part, resolve)
        facts.update({key: value for key, value in inner.items() if key != "nullable"})
    choices = [resolve(choice) for choice in schema.get("anyOf", [])]
    if any(choice.get("type") == "null" for choice in choices):
        facts["nullable"] = True
        others = [choice for choice in choices if choice.get("type") != "null"]
        if len(others) == 1:
            facts.update({key: value for key, value in _facts(others[0], resolve).items() if key != "nullable"})
    facts.update({key: schema[key] for key in _LIMITS if key in schema})
    if "properties" in schema:
        facts["properties"] = {name: _facts(value, resolve) for name, value in schema["properties"].items()}
        facts["required"] = sorted(schema.get("required", []))
    return facts


def _schema_drift(where: str, code: Mapping[str, Any], doc: Mapping[str, Any], *, with_nullable: bool) -> list[str]:
    problems = [
        f"{where}: {key} is {code[key]!r} in the code, {doc.get(key)!r} in the document"
        for key in (*_LIMITS, *(("nullable",) if with_nullable else ()))
        if key in code and code[key] != doc.get(key)
    ]
    # A free-form object (the code reads it itself) may be described by the document.
    if "properties" not in code:
        return problems
    code_props, doc_props = code["properties"], doc.get("properties", {})
    problems += [
        f"{where}: property {name} declared by the code, missing from the document"
        for name in sorted(code_props.keys() - doc_props)
    ]
    problems += [
        f"{where}: property {name} in the document, not declared by the code"
        for name in sorted(doc_props.keys() - code_props)
    ]
    if code["required"] != doc.get("required", []):
        problems.append(
            f"{where}: required properties are {code['required']} in the code, "
            f"{doc.get('required', [])} in the document"
        )
    for name in sorted(code_props.keys() & doc_props):
        problems += _schema_drift(f"{where}: property {name}", code_props[name], doc_props[name], with_nullable=True)
    return problems


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare with the committed document; exit 1 on drift")
    parser.add_argument("--document", type=Path, default=DOCUMENT, help="the document --check compares")
    arguments = parser.parse_args(argv)
    generated = generated_document()
    if not arguments.check:
        print(yaml.safe_dump(generated, sort_keys=False, allow_unicode=True), end="")
        return 0
    problems = drift(generated, committed_document(arguments.document))
    for problem in problems:
        print(problem)
    if problems:
        print(f"{arguments.document} has drifted from the handlers' resolvers ({len(problems)} differences).")
        return 1
    print(f"{arguments.document} matches the routes, parameters and request bodies the handlers declare.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
