"""Offline validation of custom resources (KEDA, Prometheus Operator) against the CRD JSON schemas vendored in
tests/deploy/schemas/ (where each comes from: schemas/README.md; how they were made: vendor_crd_schemas.py)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def schema_file(api_version: str, kind: str) -> Path:
    """The CRDs-catalog layout: schemas/<group>/<kind>_<version>.json, lower-cased."""
    group, _, version = api_version.rpartition("/")
    return SCHEMAS / group / f"{kind.lower()}_{version}.json"


@functools.cache
def _python_regex(pattern: str) -> re.Pattern[str]:
    """CRD patterns are Go RE2, which accepts an inline flag group anywhere (`^(?i)(abort|warn)?$` in PrometheusRule);
    Python wants global flags first, so `^(?i)x` becomes the equivalent `(?i)^x`. Anything else Python cannot compile
    raises, failing the test, rather than passing unchecked."""
    leading = re.match(r"\^(\(\?[aiLmsux]+\))", pattern)
    if leading:
        pattern = leading.group(1) + "^" + pattern[leading.end() :]
    return re.compile(pattern)


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _python_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# A CRD's openAPIV3Schema is an OpenAPI 3.0 schema object: JSON Schema draft 4/5 semantics (boolean exclusiveMinimum).
CrdValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _pattern})

_RE2_FORMATS = jsonschema.FormatChecker(formats=())
_RE2_FORMATS.checks("regex", raises=re.error)(lambda p: not isinstance(p, str) or bool(_python_regex(p)))


def check_schema(schema: dict[str, Any]) -> None:
    """The schema is a well-formed draft 4 schema whose patterns all compile (as RE2, see _python_regex)."""
    meta = jsonschema.Draft4Validator(jsonschema.Draft4Validator.META_SCHEMA, format_checker=_RE2_FORMATS)
    for error in meta.iter_errors(schema):
        raise jsonschema.SchemaError.create_from(error)


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    path = schema_file(api_version, kind)
    if not path.is_file():
        raise AssertionError(f"no vendored schema for {api_version} {kind}: expected {path}")
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    gvk = {"group": api_version.rpartition("/")[0], "version": api_version.rpartition("/")[2], "kind": kind}
    assert gvk in schema.get("x-kubernetes-group-version-kind", []), f"{path} is not the schema of {gvk}"
    check_schema(schema)
    return schema


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every way `doc` breaks its CRD's schema, as `path: message` lines (empty when it is valid)."""
    validator = CrdValidator(crd_schema(doc["apiVersion"], doc["kind"]))
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
