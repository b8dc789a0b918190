"""The project's description of Mender's API (tests/mender_api.yaml), and a small validator for the fields,
types, required members and enums that the stand-in Mender server checks requests and answers against.

The same reader opens Mender's published OpenAPI files, when they are at hand, for the one test that checks
the project's description against them (tests/test_mender_api.py); nothing else needs them.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OWN_DESCRIPTION = Path(__file__).resolve().parent / "mender_api.yaml"
# Mender's published files that hold the operations imageprov uses.
PUBLISHED_FILES = (
    "deviceauth/devices_v1.yaml",
    "deviceauth/management_v2.yaml",
    "useradm/management_v1.yaml",
    "deployments/devices_v1.yaml",
    "inventory/devices_v1.yaml",
)


def published_dir() -> Path | None:
    """Mender's OpenAPI files: $MENDER_API_SPECS, else shared/reference/mender-api beside the checkout."""
    if os.environ.get("MENDER_API_SPECS"):
        given = Path(os.environ["MENDER_API_SPECS"])
        return given if given.is_dir() else None
    for base in (REPO.parent, REPO.parent.parent):
        candidate = base / "shared" / "reference" / "mender-api"
        if candidate.is_dir():
            return candidate
    return None


def template_pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")


class Specs:
    """OpenAPI files, with $refs (to the same file or another) resolved on demand."""

    def __init__(self, files: Iterable[Path]) -> None:
        import yaml

        self._docs: dict[Path, Any] = {}
        self._load = lambda path: yaml.safe_load(path.read_text())
        # (method, path pattern, path template, file, operation, document)
        self.operations: list[tuple[str, re.Pattern[str], str, Path, dict[str, Any], dict[str, Any]]] = []
        for path in files:
            doc = self.doc(path)
            for template, item in doc["paths"].items():
                for method, operation in item.items():
                    self.operations.append(
                        (method.upper(), template_pattern(template), template, path.resolve(), operation, doc)
                    )

    def doc(self, path: Path) -> Any:
        path = path.resolve()
        if path not in self._docs:
            self._docs[path] = self._load(path)
        return self._docs[path]

    def resolve(self, node: Any, where: Path) -> tuple[Any, Path]:
        """Follow $ref until a node without one; return it and the file it is in."""
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            file_part, _, pointer = ref.partition("#")
            if file_part:
                where = (where.parent / file_part).resolve()
            node = self.doc(where)
            for part in pointer.strip("/").split("/"):
                if part:
                    node = node[part.replace("~1", "/").replace("~0", "~")]
        return node, where

    def operation(self, method: str, path: str) -> tuple[dict[str, Any], dict[str, Any], Path] | None:
        # The most specific template first: /devices/count before /devices/{id}.
        found = [(op, doc, where, pattern) for m, pattern, _, where, op, doc in self.operations
                 if m == method and pattern.match(path)]  # fmt: skip
        if not found:
            return None
        op, doc, where, _ = min(found, key=lambda item: item[3].pattern.count("[^/]+"))
        return op, doc, where

    def security_scheme(self, doc: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
        scheme, _ = self.resolve(doc["components"]["securitySchemes"][name], where)
        return dict(scheme)

    def validate(self, schema: Any, value: Any, where: Path, at: str = "body") -> list[str]:
        """Deviations of ``value`` from ``schema``: type, enum, required members, properties, items."""
        schema, where = self.resolve(schema, where)
        errors: list[str] = []
        kind = schema.get("type")
        types = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}
        if kind == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                return [f"{at}: {value!r} is not an integer"]
        elif kind in types:
            expected = types[kind]
            if not isinstance(value, expected) or (kind == "number" and isinstance(value, bool)):
                return [f"{at}: {type(value).__name__} where the spec has {kind}"]
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{at}: {value!r} is not one of {schema['enum']}")
        if isinstance(value, dict):
            for name in schema.get("required", []):
                if name not in value:
                    errors.append(f"{at}: required member {name!r} is missing")
            properties = schema.get("properties", {})
            extra = schema.get("additionalProperties", True)
            for name, item in value.items():
                if name in properties:
                    errors += self.validate(properties[name], item, where, f"{at}.{name}")
                elif extra is False:
                    errors.append(f"{at}: member {name!r} is not in the spec")
                elif isinstance(extra, dict):
                    errors += self.validate(extra, item, where, f"{at}.{name}")
        if isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                errors += self.validate(schema["items"], item, where, f"{at}[{index}]")
        return errors


@functools.cache
def specs() -> Specs:
    """The project's own description: what the stand-in holds every request and answer to."""
    return Specs([OWN_DESCRIPTION])


def published_specs(root: Path) -> Specs:
    return Specs([root / name for name in PUBLISHED_FILES])
