"""Deployment files: Kubernetes manifests validated offline against the API schemas, compose parsed,
and the cross-references between them and the worker's settings checked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from worker import topology
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Deployment", "PodDisruptionBudget"}
# The RabbitMQ release series the deploy files run; CI tests the worker against it (.ci/run, scripts/rabbitmq4).
RABBITMQ_IMAGE = re.compile(r"^(docker\.io/)?(library/)?rabbitmq:4\.\d+(\.\d+)?(-management)?(-alpine)?$")
# Settings of the bulk lane and the USD budget that the ConfigMap and the compose worker spell out, at their defaults.
LISTED_AT_DEFAULT = ("BULK_MAX_WAIT_MS", "BULK_MIN_SHARE", "UPSTREAM_USD_LIMIT", "UPSTREAM_USD_WINDOW_S")
# Metrics with a lane label that the dashboard must show per lane (and the other labels it groups them by).
PER_LANE = {
    "embed_requests_received_total": {"lane"},
    "embed_replies_total": {"lane", "outcome"},
    "embed_queue_wait_seconds_bucket": {"lane", "le"},
    "embed_request_seconds_bucket": {"lane", "le"},
    "embed_spend_usd_total": {"lane", "model"},
    "embed_ratelimit_wait_seconds_total": {"lane"},
}
COMPOSE_DEFAULT = re.compile(r"^\$\{([A-Z0-9_]+):-(.*)\}$")


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind)


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] in CORE_KINDS], ids=lambda d: d["kind"])
def test_core_manifests_validate_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_custom_resources_have_what_their_operators_need() -> None:
    scaled = by_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    auth = by_kind("TriggerAuthentication")
    triggers = {t["metadata"]["queueName"]: t for t in scaled["spec"]["triggers"]}
    assert sorted(triggers) == sorted([topology.QUEUE, topology.BULK_QUEUE])  # both RPC lanes, once each
    for trigger in triggers.values():
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["protocol"] == "http"  # management API: unacked messages count
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    # Bulk (ingestion) tolerates a deeper backlog per replica than queries do.
    depth = {queue: float(t["metadata"]["value"]) for queue, t in triggers.items()}
    assert depth[topology.BULK_QUEUE] > depth[topology.QUEUE] > 0
    secret = by_kind("Secret")
    assert all(ref["key"] in secret["stringData"] for ref in auth["spec"]["secretTargetRef"])
    cluster = by_kind("RabbitmqCluster")
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1" and cluster["spec"]["replicas"] >= 3
    assert "default_queue_type = quorum" in cluster["spec"]["rabbitmq"]["additionalConfig"]
    assert RABBITMQ_IMAGE.match(cluster["spec"]["image"]), cluster["spec"]["image"]  # RabbitMQ 4.x


def test_deployment_probes_grace_and_settings_agree_with_the_worker() -> None:
    config = by_kind("ConfigMap")["data"]
    secret = by_kind("Secret")["stringData"]
    fields = {name.upper() for name in Settings.model_fields}
    unknown = {k for k in {**config, **secret} if k not in fields and k != "RABBITMQ_MANAGEMENT_URL"}
    assert not unknown, f"settings the worker does not read: {unknown}"
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(config["SHUTDOWN_GRACE_S"])
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == int(config["METRICS_PORT"])
    Settings(_env_file=None, **{k.lower(): v for k, v in config.items()}, gemini_api_key="x")  # type: ignore[call-arg]
    assert_listed_at_default(config, "ConfigMap")


def assert_listed_at_default(env: dict[str, Any], where: str) -> None:
    fields = Settings.model_fields
    for name in LISTED_AT_DEFAULT:
        assert name in env, f"{where} does not list {name}"
        assert name.lower() in fields, f"{where} lists {name}, which the worker does not read"
        assert float(env[name]) == fields[name.lower()].default, f"{where}: {name}={env[name]}, not the default"


def test_compose_file_parses_and_workers_wait_for_a_healthy_broker() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["rabbitmq"]["healthcheck"]["test"]
    worker = services["worker"]
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 2
    assert services["emulator"]["profiles"] == ["emulator"]
    assert worker["healthcheck"]["test"]
    # Every variable is a setting; "${NAME:-default}" overrides NAME and defaults to what the worker accepts.
    env: dict[str, Any] = {}
    for key, raw in worker["environment"].items():
        match = COMPOSE_DEFAULT.match(str(raw))
        if match:
            assert match[1] == key, f"{key} reads ${{{match[1]}}}"
        env[key] = match[2] if match else raw
    fields = {name.upper() for name in Settings.model_fields}
    assert not set(env) - fields, f"settings the worker does not read: {set(env) - fields}"
    assert_listed_at_default(env, "compose worker")
    Settings(_env_file=None, **{k.lower(): v for k, v in env.items() if v != ""})  # type: ignore[call-arg]


def test_the_cluster_profile_has_three_nodes_and_workers_that_list_them_all() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    nodes = [
        name
        for name, svc in services.items()
        if svc.get("profiles") == ["cluster"] and "rabbitmq" in svc.get("image", "")
    ]
    assert sorted(nodes) == ["rabbit1", "rabbit2", "rabbit3"]
    assert {services[n]["hostname"] for n in nodes} == set(nodes)
    assert len({services[n]["environment"]["RABBITMQ_ERLANG_COOKIE"] for n in nodes}) == 1
    conf = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text()
    assert all(f"rabbit@{n}" in conf for n in nodes) and all("cluster.conf" in services[n]["volumes"][0] for n in nodes)
    worker = services["cluster-worker"]
    urls = worker["environment"]["AMQP_URL"].split(",")
    assert sorted(u.split("@")[1].split(":")[0] for u in urls) == sorted(nodes)
    assert set(worker["depends_on"]) == set(nodes) and worker["deploy"]["replicas"] >= 2
    settings = {k.lower(): v for k, v in worker["environment"].items() if not str(v).startswith("${")}
    Settings(_env_file=None, **settings, gemini_api_key="x")  # type: ignore[call-arg]  # the worker accepts them


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads((ROOT / "deploy" / "grafana" / "embed-worker.json").read_text())["panels"]
    return panels


def metric_base(name: str) -> str:
    return name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")


def grouped_by(expr: str) -> set[str]:
    """The labels of an expression's ``by (...)`` clauses."""
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in group.split(",")}


def test_grafana_dashboard_uses_only_metrics_and_labels_the_worker_exports() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from worker.metrics import Metrics

    metrics = Metrics()
    exported = {m.name for m in metrics.registry.collect()}
    # A labelled metric with no samples yet shows no labels through collect(): read them off the registered metrics.
    collectors = list(metrics.registry._collector_to_names)  # prometheus_client keeps no public list
    labels = {m._name: set(m._labelnames) for m in collectors if isinstance(m, MetricWrapperBase)}
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    for expr in exprs:
        names = set(re.findall(r"embed_[a-z_]+", expr))
        grouped = grouped_by(expr)
        for name in names:
            base = metric_base(name)
            assert base in exported, f"dashboard uses {name}, not exported"
            extra = grouped - {"le"} - labels.get(base, set())
            assert not extra, f"{expr}: {name} has no label {extra}"


def test_grafana_dashboard_shows_each_lane_and_keeps_its_layout() -> None:
    panels = dashboard_panels()
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    for name, grouped in PER_LANE.items():
        assert any(name in expr and grouped_by(expr) == grouped for expr in exprs), (
            f"no panel shows {name} by {grouped}"
        )
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)), "panels overlap"
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)  # Grafana's grid is 24 wide


def test_every_rabbitmq_image_is_4x() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = {name: svc["image"] for name, svc in compose["services"].items() if "rabbitmq" in svc.get("image", "")}
    assert set(images) == {"rabbitmq", "rabbit1", "rabbit2", "rabbit3"}
    images["k8s RabbitmqCluster"] = by_kind("RabbitmqCluster")["spec"]["image"]
    not_4x = {name: image for name, image in images.items() if not RABBITMQ_IMAGE.match(image)}
    assert not not_4x, f"not a RabbitMQ 4.x image: {not_4x}"


def test_the_gateway_deployment_and_service_agree_with_the_gateway() -> None:
    from worker.gateway.settings import GatewaySettings

    docs = {
        d["kind"]: d
        for path in ("gateway-deployment.yaml", "gateway-service.yaml")
        for d in yaml.safe_load_all((K8S / path).read_text())
        if d
    }
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.30", strict=True)
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["gateway"]
    env = {e["name"]: e for e in container["env"]}
    fields = {name.upper() for name in GatewaySettings.model_fields}
    assert not set(env) - fields, f"settings the gateway does not read: {set(env) - fields}"
    assert "secretKeyRef" in env["GATEWAY_API_KEYS"]["valueFrom"]  # a key is never a plain value in the manifest
    assert env["AMQP_URL"]["valueFrom"]["secretKeyRef"]["name"] == by_kind("Secret")["metadata"]["name"]
    port = int(env["GATEWAY_PORT"]["value"])
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > float(env["GATEWAY_REQUEST_TIMEOUT_S"]["value"])
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    values = {k.lower(): e["value"] for k, e in env.items() if "value" in e}
    GatewaySettings(_env_file=None, gateway_api_keys="k", **values)  # type: ignore[call-arg,arg-type]  # it accepts them


def test_compose_runs_the_gateway_after_a_healthy_broker() -> None:
    from worker.gateway.settings import GatewaySettings

    gateway = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]
    assert gateway["command"] == ["gateway"]
    assert gateway["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    env = {}
    for key, raw in gateway["environment"].items():
        match = COMPOSE_DEFAULT.match(str(raw))
        env[key] = match[2] if match else raw
    assert not set(env) - {name.upper() for name in GatewaySettings.model_fields}
    GatewaySettings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg,arg-type]
