"""Mender's OpenAPI files, read (never copied) from ../shared/reference/mender-api, and a small validator
for the fields, types, required members and enums the stand-in Mender server checks requests and answers
against."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SPEC_FILES = ("deviceauth/devices_v1.yaml", "deviceauth/management_v2.yaml", "useradm/management_v1.yaml")


def spec_dir() -> Path:
    """../shared/reference/mender-api beside the clone (or beside the directory of worktrees)."""
    if os.environ.get("MENDER_API_SPECS"):
        return Path(os.environ["MENDER_API_SPECS"])
    for base in (REPO.parent, REPO.parent.parent):
        candidate = base / "shared" / "reference" / "mender-api"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"Mender's API specs are not at {REPO.parent / 'shared/reference/mender-api'}")


class Specs:
    """The OpenAPI files, with $refs (to this file or another) resolved on demand."""

    def __init__(self, root: Path) -> None:
        import yaml

        self.root = root
        self._docs: dict[Path, Any] = {}
        self._load = lambda path: yaml.safe_load(path.read_text())
        self.operations: list[tuple[str, re.Pattern[str], Path, dict[str, Any], dict[str, Any]]] = []
        for name in SPEC_FILES:
            path = root / name
            doc = self.doc(path)
            for template, item in doc["paths"].items():
                pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
                for method, operation in item.items():
                    self.operations.append((method.upper(), pattern, path, operation, doc))

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
        found = [(op, doc, where, pattern) for m, pattern, where, op, doc in self.operations
                 if m == method and pattern.match(path)]  # fmt: skip
        if not found:
            return None
        op, doc, where, _ = min(found, key=lambda item: item[3].pattern.count("[^/]+"))
        return op, doc, where

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
    return Specs(spec_dir())
