"""The deploy/ files: Kubernetes manifests against the bundled API schema, the sidecar's Envoy
config through `envoy --mode validate`, and the metric names in the dashboard and the alerts."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from devstack import processes as p
from extauthz.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
LAYOUTS = ("sidecar", "shared-tier")
DASHBOARD = ROOT / "deploy" / "grafana" / "extauthz-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
ENVOY_YAML = ROOT / "envoy.yaml"
# The one other image the manifests run: Envoy, in the sidecar layout.
ENVOY_IMAGE_REPOSITORY = "envoyproxy/envoy"

# The newest Kubernetes whose schemas kubernetes-validate bundles (e.g. "1.37.0").
KUBERNETES_VERSION: str = str(kubernetes_validate.latest_version())

# What extauthz exports (extauthz/metrics.py), by exact name. Histograms also appear
# as their _bucket, _count and _sum series.
COUNTERS = {
    "ailb_key_requests_total",
    "ailb_key_tokens_total",
    "ailb_key_cost_total",
    "ailb_key_validation_failures_total",
    "extauthz_usage_reports_total",
    "extauthz_redis_errors_total",
    "extauthz_reservations_opened_total",
    "extauthz_reservations_settled_total",
    "extauthz_reservations_expired_total",
    "extauthz_reserved_usd_total",
    "extauthz_shadow_denials_total",
    "extauthz_tap_unmetered_total",
    "extauthz_tap_responses_total",
    "extauthz_alerts_sent_total",
    "extauthz_alerts_retried_total",
    "extauthz_alerts_failed_total",
}
HISTOGRAMS = {"extauthz_check_duration_seconds", "extauthz_redis_latency_seconds"}
GAUGES = {"extauthz_usage_journal_depth", "extauthz_redis_up", "extauthz_alerts_pending"}
# What the ledger sink exports on its own port (ledger/metrics.py): alerts, no dashboard.
LEDGER_METRICS = {
    "extauthz_ledger_lag",
    "extauthz_ledger_rows_total",
    "extauthz_ledger_duplicates_total",
    "extauthz_ledger_errors_total",
}
KNOWN_METRICS = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
)

Document = dict[str, Any]


# ---------------------------------------------------------------- Kubernetes


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


def load_documents(path: Path) -> list[Document]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> Iterator[tuple[str, Document]]:
    for path in manifest_files():
        for doc in load_documents(path):
            name = doc.get("metadata", {}).get("name", "?")
            yield f"{path.relative_to(KUBERNETES)}:{doc.get('kind', '?')}/{name}", doc


MANIFESTS = list(manifests())


def layout(name: str) -> dict[str, list[Document]]:
    """The documents of one layout directory, by kind."""
    kinds: dict[str, list[Document]] = {}
    for path in sorted((KUBERNETES / name).glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_documents(path):
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def the_one(kinds: dict[str, list[Document]], kind: str) -> Document:
    assert len(kinds.get(kind, [])) == 1, f"expected exactly one {kind}"
    return kinds[kind][0]


def pod_spec(deployment: Document) -> Document:
    spec: Document = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: Document) -> list[Document]:
    spec = pod_spec(deployment)
    return [*spec.get("initContainers", []), *spec["containers"]]


# Set by a `make test` around pytest, or by hand: either would override the Makefile's own.
MAKE_OVERRIDES = {"IMAGE", "TAG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}


@functools.cache
def makefile_image() -> str:
    """IMAGE:TAG as the Makefile defines them: what `make image` builds."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_OVERRIDES}
    result = subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(ROOT), "image-name"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=env,
    )
    return result.stdout.strip()


def extauthz_container(deployment: Document) -> Document:
    found = [c for c in containers(deployment) if c.get("command", [])[:2] == ["extauthz", "serve"]]
    assert len(found) == 1, "expected one container running `extauthz serve`"
    return found[0]


class ReadNames(dict[str, str]):
    """An empty environment that notes every name looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def settings_env_names() -> set[str]:
    """Every environment variable Settings.from_env looks up (all of them, with none set)."""
    env = ReadNames()
    Settings.from_env(env)
    return env.read


@pytest.mark.parametrize("doc", [doc for _, doc in MANIFESTS], ids=[i for i, _ in MANIFESTS])
def test_manifest_matches_the_kubernetes_schema(doc: Document) -> None:
    try:
        validated = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"Kubernetes {exc.version} (strict): {where}: {exc.message}")
    assert validated == ".".join(KUBERNETES_VERSION.split(".")[:2])


def test_every_manifest_was_found() -> None:
    assert {i.split(":")[1] for i, _ in MANIFESTS} >= {
        "Deployment/llm-gateway",
        "ConfigMap/llm-gateway-envoy",
        "Service/llm-gateway",
        "Deployment/extauthz",
        "Service/extauthz",
        "Service/extauthz-headless",
        "HorizontalPodAutoscaler/extauthz",
    }


def test_make_image_tags_the_image_with_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert makefile_image() == f"extauthz:{version}"


def test_every_extauthz_container_runs_the_image_make_image_builds() -> None:
    image = makefile_image()
    ours = 0
    for where, doc in MANIFESTS:
        if doc["kind"] != "Deployment":
            continue
        for container in containers(doc):
            if container.get("command", [])[:1] == ["extauthz"]:
                assert container["image"] == image, f"{where}: {container['name']}"
                ours += 1
            else:  # nothing else but Envoy, whose image is not ours to build
                repository = container["image"].rpartition(":")[0]
                assert repository == ENVOY_IMAGE_REPOSITORY, f"{where}: {container['name']}"
    assert ours == 4  # the sidecar, the shared tier, the ledger's migrate and its sink


@pytest.mark.parametrize(
    "document",
    [
        "README.md",
        "docs/operations.md",
        "deploy/kubernetes/README.md",
        *(f"deploy/kubernetes/{name}/kustomization.yaml" for name in (*LAYOUTS, "ledger")),
    ],
)
def test_docs_name_the_image_make_image_builds(document: str) -> None:
    text = (ROOT / document).read_text()
    assert makefile_image() in text
    assert "make image" in text
    assert "ghcr.io/example" not in text


@pytest.mark.parametrize("name", LAYOUTS)
def test_kustomization_lists_exactly_the_manifests_of_its_directory(name: str) -> None:
    directory = KUBERNETES / name
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(listed) == on_disk


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("sidecar", {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}),
        (
            "shared-tier",
            {"Deployment", "Service", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"},
        ),
    ],
    ids=LAYOUTS,
)
def test_layout_has_its_resources(name: str, kinds: set[str]) -> None:
    assert set(layout(name)) == kinds


@pytest.mark.parametrize("name", LAYOUTS)
def test_selectors_and_references_resolve_within_the_layout(name: str) -> None:
    kinds = layout(name)
    deployment = the_one(kinds, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for service in kinds["Service"]:
        assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = the_one(kinds, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for hpa in kinds.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    secrets = {s["metadata"]["name"]: s for s in kinds["Secret"]}
    refs = [
        env["valueFrom"]["secretKeyRef"]
        for env in extauthz_container(deployment)["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    ]
    assert refs, "the tokens come from a Secret"
    for ref in refs:
        if ref.get("optional") and ref["name"] not in secrets:
            continue  # another layout's Secret (the ledger's), used where it exists
        assert ref["key"] in secrets[ref["name"]]["stringData"]
    config_maps = {c["metadata"]["name"]: c for c in kinds.get("ConfigMap", [])}
    for volume in pod_spec(deployment)["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps


@pytest.mark.parametrize("name", LAYOUTS)
def test_extauthz_env_names_are_the_ones_settings_reads(name: str) -> None:
    env = {e["name"] for e in extauthz_container(the_one(layout(name), "Deployment"))["env"]}
    assert {"REDIS_URL", "EXTAUTHZ_ADMIN_TOKEN", "EXTAUTHZ_USAGE_TOKEN"} <= env
    assert env <= settings_env_names()


@pytest.mark.parametrize("name", LAYOUTS)
def test_extauthz_probes_readiness_on_grpc_health_and_liveness_without_redis(name: str) -> None:
    container = extauthz_container(the_one(layout(name), "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 9191, "metrics": 9192}
    assert container["readinessProbe"]["grpc"]["port"] == 9191
    # gRPC health is NOT_SERVING while Redis is down: liveness must not restart on that.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9192}


@pytest.mark.parametrize("name", LAYOUTS)
def test_containers_are_locked_down_and_sized(name: str) -> None:
    deployment = the_one(layout(name), "Deployment")
    assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True
    for container in containers(deployment):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert "memory" in container["resources"]["limits"]


# ---------------------------------------------------------------- the sidecar's Envoy


def sidecar_envoy_config() -> str:
    config_map = the_one(layout("sidecar"), "ConfigMap")
    text: str = config_map["data"]["envoy.yaml"]
    return text


def http_filter(config: Document, name: str) -> Document:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    found: list[Document] = [f for f in manager["http_filters"] if f["name"] == name]
    assert len(found) == 1, f"expected one {name} filter"
    return found[0]


def cluster_address(config: Document, name: str) -> tuple[str, int]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    socket = endpoint["address"]["socket_address"]
    return socket["address"], socket["port_value"]


def test_sidecar_envoy_config_passes_envoy_validate(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(sidecar_envoy_config())
    result = subprocess.run(
        [p.executable("envoy"), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output


def test_sidecar_envoy_listens_on_all_addresses_and_asks_the_local_extauthz() -> None:
    config = yaml.safe_load(sidecar_envoy_config())
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (listener["address"], listener["port_value"]) == ("0.0.0.0", 10000)
    assert cluster_address(config, "extauthz") == ("127.0.0.1", 9191)
    (upstream,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "llm_upstream"]
    assert upstream["type"] == "STRICT_DNS"
    assert cluster_address(config, "llm_upstream")[0].endswith(".svc.cluster.local")


def test_sidecar_ext_authz_settings_are_envoy_yamls() -> None:
    ours = http_filter(yaml.safe_load(sidecar_envoy_config()), "envoy.filters.http.ext_authz")
    shipped = http_filter(yaml.safe_load(ENVOY_YAML.read_text()), "envoy.filters.http.ext_authz")
    assert ours["typed_config"] == shipped["typed_config"]
    assert ours["typed_config"]["grpc_service"]["timeout"] == "0.5s"
    assert ours["typed_config"]["failure_mode_allow"] is False


# ---------------------------------------------------------------- PromQL


_STRINGS = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A name not inside another token (a number, a duration) and not a function call.
_NAME = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, values, functions,
    keywords, ranges and Grafana's $variables left out)."""
    text = _STRINGS.sub(" ", expr)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def test_metric_names_finds_selectors_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{op="x",y=~"b|c"}[5m])))'
        ' > 0.05 and on (job) b offset 5m or absent(up{job="j"}) / ignoring (z) '
        "topk(10, c_total[$__rate_interval]) * 1e3 unless sum without (q) (d)"
    )
    assert metric_names(expr) == {"a_bucket", "b", "up", "c_total", "d"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_queries_only_known_metrics() -> None:
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= KNOWN_METRICS, expr


def test_dashboard_shows_every_metric() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for name in COUNTERS | GAUGES:
        assert name in used
    for name in HISTOGRAMS:
        assert f"{name}_bucket" in used  # a latency histogram is shown as quantiles


def test_dashboard_takes_its_datasource_from_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for source in [panel, *panel.get("targets", [])]:
            if panel["type"] != "row":
                assert source["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def alert_rules() -> list[Document]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["expr"].strip()
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys()


def test_alert_expressions_use_only_known_metrics_or_up() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= KNOWN_METRICS | LEDGER_METRICS | {"up"}, rule["alert"]
        used |= names
    assert "up" in used
    for name in (
        "ailb_key_validation_failures_total",
        "extauthz_check_duration_seconds_bucket",
        "extauthz_redis_errors_total",
        "extauthz_usage_reports_total",
    ):
        assert name in used


def test_alert_runbooks_point_at_headings_of_the_operations_doc() -> None:
    headings = re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), flags=re.MULTILINE)
    anchors = {github_anchor(h) for h in headings}
    for rule in alert_rules():
        document, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert document == "docs/operations.md"
        assert anchor in anchors, rule["alert"]


def test_sidecar_configmap_is_what_make_manifests_writes_from_envoy_yaml() -> None:
    """The sidecar's Envoy config is generated (devstack/sidecar_config.py): every edge
    defence in envoy.yaml reaches Kubernetes too."""
    from devstack import sidecar_config

    expected = sidecar_config.configmap(ENVOY_YAML.read_text())
    assert sidecar_config.CONFIGMAP.read_text() == expected, "run `make manifests`"


def test_sidecar_envoy_keeps_every_edge_defence_of_envoy_yaml() -> None:
    ours = yaml.safe_load(sidecar_envoy_config())
    manager = ours["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    config = manager["typed_config"]
    assert config["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "DROP_HEADER"
    )
    assert config["normalize_path"] is True
    assert config["early_header_mutation_extensions"][0]["typed_config"]["mutations"] == [
        {"remove": "x-request-id"}
    ]
    assert [f["name"] for f in config["http_filters"]] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz.key_first",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ext_proc.clamp",  # the usage tap, fail-closed for clamps
        "envoy.filters.http.ext_proc",  # the usage tap, where it changes bytes
        "envoy.filters.http.ext_proc.meter",  # the usage tap, observing only
        "envoy.filters.http.router",
    ]


def test_the_lists_above_are_every_metric_extauthz_exports() -> None:
    """So a new metric cannot miss the dashboard (test_dashboard_shows_every_metric)."""
    from prometheus_client.metrics_core import Metric

    from extauthz.metrics import Metrics

    families: list[Metric] = list(Metrics().registry.collect())
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert exported == COUNTERS | GAUGES | HISTOGRAMS


def test_the_ledger_list_is_every_metric_the_sink_exports() -> None:
    """So the alerts cannot name a ledger metric the sink does not have."""
    from ledger.metrics import LedgerMetrics

    families = list(LedgerMetrics().registry.collect())
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert exported == LEDGER_METRICS


def test_sidecar_envoy_leaves_out_the_console_with_the_api_it_calls() -> None:
    """The console calls /api, which the sidecar has not: its route and cluster go too, and
    /ui is the upstream's there, behind ext_authz like any path."""
    config = yaml.safe_load(sidecar_envoy_config())
    assert "extauthz_http" not in {c["name"] for c in config["static_resources"]["clusters"]}
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    prefixes = {r["match"].get("path_separated_prefix") for r in routes}
    assert not prefixes & {"/ui", "/api", "/api/keys", "/api/usage", "/api/budgets"}
    shipped = yaml.safe_load(ENVOY_YAML.read_text())
    assert "extauthz_http" in {c["name"] for c in shipped["static_resources"]["clusters"]}
