"""The project's description of Mender's API (tests/mender_api.yaml) against Mender's published OpenAPI files.

The stand-in Mender server holds every request and answer to the project's description; this checks that
the description says nothing Mender's own files do not: every operation, status code, parameter, security
scheme, content type, field, type, enum value and required member named there exists in Mender's files the
same way. Mender's files are read from $MENDER_API_SPECS or shared/reference/mender-api beside the checkout;
outside CI the test skips, saying so, when they are absent (a clone on its own has none); in CI it fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.mender_spec import OWN_DESCRIPTION, Specs, published_dir, published_specs, specs, template_pattern


@pytest.fixture(scope="module")
def published() -> Specs:
    root = published_dir()
    if root is None:
        message = "Mender's OpenAPI files are absent (set MENDER_API_SPECS to their folder to check against them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return published_specs(root)


def _type(schema: dict[str, Any]) -> str | None:
    if "type" in schema:
        return str(schema["type"])
    return "object" if "properties" in schema or "additionalProperties" in schema else None


def schema_differences(own: Specs, own_node: Any, own_at: Path, theirs: Specs, their_node: Any, their_at: Path,
                       where: str) -> list[str]:  # fmt: skip
    """What ``own_node`` says that ``their_node`` does not (both schemas, $refs followed on each side)."""
    mine, own_at = own.resolve(own_node, own_at)
    other, their_at = theirs.resolve(their_node, their_at)
    found: list[str] = []
    if _type(mine) is not None and _type(mine) != _type(other):
        return [f"{where}: type {_type(mine)}, Mender's files have {_type(other)}"]
    if "enum" in mine:
        extra = set(mine["enum"]) - set(other.get("enum", mine["enum"]))
        if extra:
            found.append(f"{where}: enum values {sorted(extra)} are not in Mender's files")
    if set(mine.get("required", [])) != set(other.get("required", [])):
        found.append(f"{where}: required {sorted(mine.get('required', []))}, Mender's files have "
                     f"{sorted(other.get('required', []))}")  # fmt: skip
    if mine.get("additionalProperties") is False and other.get("additionalProperties", True) is not False:
        found.append(f"{where}: closed to other members, Mender's files are not")
    their_properties = other.get("properties", {})
    for name, schema in mine.get("properties", {}).items():
        if name not in their_properties:
            found.append(f"{where}.{name}: no such member in Mender's files")
            continue
        found += schema_differences(own, schema, own_at, theirs, their_properties[name], their_at, f"{where}.{name}")
    if "items" in mine:
        if "items" not in other:
            found.append(f"{where}[]: Mender's files give no item schema")
        else:
            found += schema_differences(own, mine["items"], own_at, theirs, other["items"], their_at, f"{where}[]")
    return found


def _content_differences(own: Specs, mine: Any, own_at: Path, theirs: Specs, other: Any, their_at: Path,
                         where: str) -> list[str]:  # fmt: skip
    found: list[str] = []
    their_content = other.get("content") or {}
    for media, body in (mine.get("content") or {}).items():
        if media not in their_content:
            found.append(f"{where}: content type {media} is not in Mender's files ({sorted(their_content)})")
            continue
        found += schema_differences(
            own, body["schema"], own_at, theirs, their_content[media]["schema"], their_at, f"{where} {media}"
        )
    return found


def operation_differences(own: Specs, theirs: Specs) -> list[str]:
    """Every way the project's description is not Mender's, operation by operation."""
    found: list[str] = []
    for method, _, template, own_at, mine, own_doc in own.operations:
        name = f"{method} {template}"
        wanted = template_pattern(template).pattern
        matches = [(op, doc, at) for m, pattern, _, at, op, doc in theirs.operations
                   if m == method and pattern.pattern == wanted]  # fmt: skip
        if not matches:
            found.append(f"{name}: no such operation in Mender's files")
            continue
        other, their_doc, their_at = matches[0]
        # Security: every scheme named here is one of the operation's (or its file's) there, of the same kind.
        their_security = other.get("security", their_doc.get("security", []))
        their_schemes = {
            theirs.security_scheme(their_doc, scheme, their_at).get("scheme")
            for requirement in their_security
            for scheme in requirement
        }
        for requirement in mine.get("security", []):
            for scheme in requirement:
                kind = own.security_scheme(own_doc, scheme, own_at).get("scheme")
                if kind not in their_schemes:
                    found.append(f"{name}: security {kind} ({scheme}), Mender's files have {sorted(their_schemes)}")
        # Parameters: same place, same requiredness, same schema.
        their_parameters = {}
        for parameter in other.get("parameters", []):
            parameter, at = theirs.resolve(parameter, their_at)
            their_parameters[(parameter["in"], parameter["name"])] = (parameter, at)
        for parameter in mine.get("parameters", []):
            parameter, at = own.resolve(parameter, own_at)
            key = (parameter["in"], parameter["name"])
            if key not in their_parameters:
                found.append(f"{name}: no {key[0]} parameter {key[1]} in Mender's files")
                continue
            other_parameter, other_at = their_parameters[key]
            if bool(parameter.get("required")) != bool(other_parameter.get("required")):
                found.append(f"{name}: {key[0]} parameter {key[1]} required={bool(parameter.get('required'))}, "
                             f"Mender's files say {bool(other_parameter.get('required'))}")  # fmt: skip
            found += schema_differences(
                own, parameter.get("schema", {}), at, theirs, other_parameter.get("schema", {}), other_at,
                f"{name} parameter {key[1]}",
            )  # fmt: skip
        # The request body.
        if "requestBody" in mine:
            body, at = own.resolve(mine["requestBody"], own_at)
            if "requestBody" not in other:
                found.append(f"{name}: Mender's files take no request body")
            else:
                their_body, their_body_at = theirs.resolve(other["requestBody"], their_at)
                if bool(body.get("required")) != bool(their_body.get("required")):
                    found.append(f"{name}: request body required={bool(body.get('required'))}, Mender's files say "
                                 f"{bool(their_body.get('required'))}")  # fmt: skip
                found += _content_differences(own, body, at, theirs, their_body, their_body_at, f"{name} body")
        # Answers: every status listed here is listed there, with the same content.
        their_responses = other.get("responses", {})
        for status, response in mine.get("responses", {}).items():
            if str(status) not in {str(s) for s in their_responses}:
                found.append(f"{name}: status {status} is not in Mender's files ({sorted(map(str, their_responses))})")
                continue
            their_response = next(r for s, r in their_responses.items() if str(s) == str(status))
            response, at = own.resolve(response, own_at)
            their_response, their_response_at = theirs.resolve(their_response, their_at)
            found += _content_differences(
                own, response, at, theirs, their_response, their_response_at, f"{name} answer {status}"
            )
    return found


def test_the_description_says_only_what_menders_files_say(published: Specs) -> None:
    differences = operation_differences(specs(), published)
    assert differences == [], "\n".join(differences)


def test_the_cross_check_catches_a_wrong_description(published: Specs, tmp_path: Path) -> None:
    # The check must be able to fail: each of these edits to a copy of the description is found.
    text = OWN_DESCRIPTION.read_text()
    edits = {
        "a wrong type": ("pubkey: {type: string}\n        # Replace", "pubkey: {type: integer}\n        # Replace"),
        "an invented member": ("tenant_token: {type: string}",
                               "tenant_token: {type: string}\n        nonce: {type: string}"),
        "an invented status": ('"409":\n', '"418": {}\n        "409":\n'),
        "an invented operation": ("  /api/management/v2/devauth/devices/{id}:\n",
                                  "  /api/management/v2/devauth/devices/{id}/teleport:\n    post: {responses: {}}\n"
                                  "  /api/management/v2/devauth/devices/{id}:\n"),
        "a wrong required member": ("required: [status]", "required: [status, reason]"),
        "an invented enum value": ("enum: [pending, accepted, rejected, preauthorized]}",
                                   "enum: [pending, accepted, rejected, preauthorized, banned]}"),
    }  # fmt: skip
    for what, (old, new) in edits.items():
        assert old in text, what
        edited = tmp_path / f"{what.replace(' ', '-')}.yaml"
        edited.write_text(text.replace(old, new, 1))
        assert operation_differences(Specs([edited]), published), f"{what} went unnoticed"


def test_the_description_is_self_contained() -> None:
    # Every $ref points into the description itself: a clone needs nothing beside it.
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [str(v) for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
        return [r for item in node for r in refs(item)] if isinstance(node, list) else []

    found = refs(specs().doc(OWN_DESCRIPTION))
    assert found and all(ref.startswith("#/") for ref in found)
    for ref in found:  # and each one resolves
        specs().resolve({"$ref": ref}, OWN_DESCRIPTION)
