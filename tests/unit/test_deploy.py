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

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Deployment", "PodDisruptionBudget"}
# The RabbitMQ release series the deploy files run; CI tests the worker against it (.ci/run, scripts/rabbitmq4).
RABBITMQ_IMAGE = re.compile(r"^(docker\.io/)?(library/)?rabbitmq:4\.\d+(\.\d+)?(-management)?(-alpine)?$")


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
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == "embed.requests"
    assert trigger["metadata"]["protocol"] == "http"  # management API: unacked messages count
    auth = by_kind("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
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


def test_compose_file_parses_and_workers_wait_for_a_healthy_broker() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["rabbitmq"]["healthcheck"]["test"]
    worker = services["worker"]
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 2
    assert services["emulator"]["profiles"] == ["emulator"]
    assert worker["healthcheck"]["test"]


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


def test_grafana_dashboard_uses_only_metrics_the_worker_exports() -> None:
    from worker.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "embed-worker.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"embed_[a-z_]+", expr)}
    for name in used:
        base = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        assert base in exported, f"dashboard uses {name}, not exported"


def test_every_rabbitmq_image_is_4x() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = {name: svc["image"] for name, svc in compose["services"].items() if "rabbitmq" in svc.get("image", "")}
    assert set(images) == {"rabbitmq", "rabbit1", "rabbit2", "rabbit3"}
    images["k8s RabbitmqCluster"] = by_kind("RabbitmqCluster")["spec"]["image"]
    not_4x = {name: image for name, image in images.items() if not RABBITMQ_IMAGE.match(image)}
    assert not not_4x, f"not a RabbitMQ 4.x image: {not_4x}"
