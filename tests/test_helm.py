"""The Helm chart rendered by the real Helm engine, validated against Kubernetes schemas and
checkov."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip(
    "helm_python", reason="helm-python-sdk (the Helm engine) not installed"
)
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "helm" / "thighseg"
KUBERNETES_VERSION = "1.33"
CRDS = {"ServiceMonitor"}  # not in the core schemas; checked by hand below
DIGEST = "sha256:" + "ab" * 32

VALUE_SETS = {
    "default": {},
    "gpu_off": {"triton": {"gpu": {"enabled": False}}},
    "tls_on": {
        "listener": {
            "tls": {"enabled": True, "secretName": "dicom-tls", "requireClientCertificate": True},
            "allowedCallingAETitles": ["CT_SCANNER", "PACS"],
        }
    },
    "autoscaling_cpu": {"triton": {"autoscaling": {"enabled": True}}},
    "autoscaling_queue": {
        "triton": {"autoscaling": {"enabled": True, "queueMetric": {"enabled": True}}}
    },
    "external_model_store": {
        "triton": {
            "modelRepository": {
                "source": "external",
                "external": {
                    "uri": "s3://hospital-models/thighseg",
                    "credentialsSecret": "model-store",
                },
            }
        }
    },
    "pvc_model_store": {
        "triton": {"modelRepository": {"source": "pvc", "pvc": {"claimName": "thighseg-models"}}}
    },
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}}
    },
    "nodeport_pinned": {
        "listener": {"service": {"type": "NodePort", "nodePort": 31112}},
        "images": {
            "triton": {"repository": "r/t", "tag": "1", "digest": DIGEST},
            "listener": {"repository": "r/l", "tag": "1", "digest": DIGEST},
        },
    },
    "listener_scaled": {"listener": {"replicas": 3, "service": {"type": "LoadBalancer"}}},
    # what users of bitnami-style charts set
    "cluster_admin": {
        "global": {"imageRegistry": "mirror.hospital:5000"},
        "fullnameOverride": "muscle",
        "serviceAccount": {"create": True, "name": "muscle-sa"},
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "containerSecurityContext": {"runAsUser": None},
        "listener": {
            "nodeSelector": {"node-role": "dicom"},
            "tolerations": [{"key": "dicom", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "podAnnotations": {"backup.velero.io/backup-volumes": "spool"},
            "extraEnv": [{"name": "TZ", "value": "Europe/Berlin"}],
            "spool": {"existingClaim": "dicom-spool"},
        },
        "triton": {"extraEnv": [{"name": "OMP_NUM_THREADS", "value": "4"}]},
    },
}


def render(values: dict) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(values, name="thighseg", namespace="radiology")
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def container(docs: list[dict], kind: str) -> dict:
    return by_kind(docs, kind)[0]["spec"]["template"]["spec"]["containers"][0]


def test_chart_lints_without_errors():
    result = helm_python.lint(str(CHART))
    assert result["errors"] == []
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(name):
    docs = render(VALUE_SETS[name])
    assert by_kind(docs, "Deployment") and by_kind(docs, "StatefulSet")
    for doc in docs:
        assert doc["metadata"].get("namespace") == "radiology", doc["metadata"]["name"]
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_default_triton_on_gpu_with_health_probes_and_non_root():
    docs = render({})
    triton = container(docs, "Deployment")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for workload in (*by_kind(docs, "Deployment"), *by_kind(docs, "StatefulSet")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    listener = by_kind(docs, "StatefulSet")[0]
    assert listener["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "spool"
    dicom = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "thighseg-dicom")
    assert dicom["spec"]["type"] == "ClusterIP"  # exposing DICOM outside the cluster is a choice
    listener_container = container(docs, "StatefulSet")
    assert listener_container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert listener_container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert listener_container["imagePullPolicy"] == "IfNotPresent"
    assert {d["metadata"]["name"] for d in docs if d["kind"] != "ConfigMap"} >= {
        "thighseg-triton",
        "thighseg-listener",
    }, "no thighseg-thighseg-* names when the release is named after the chart"
    assert len(by_kind(docs, "PodDisruptionBudget")) == 2 and not by_kind(
        docs, "HorizontalPodAutoscaler"
    )


def test_network_policies_only_let_the_listener_reach_triton():
    policies = {p["metadata"]["name"]: p for p in by_kind(render({}), "NetworkPolicy")}
    triton_ingress = policies["thighseg-triton"]["spec"]["ingress"]
    inference = [
        rule for rule in triton_ingress if {"port": 8000, "protocol": "TCP"} in rule["ports"]
    ]
    assert len(inference) == 1
    assert (
        inference[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "listener"
    )
    dicom = policies["thighseg-listener"]["spec"]["ingress"][0]
    assert dicom["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]


def test_the_conventions_a_cluster_admin_knows():
    docs = render(VALUE_SETS["cluster_admin"])
    listener = by_kind(docs, "StatefulSet")[0]
    pod = listener["spec"]["template"]["spec"]
    assert listener["metadata"]["name"] == "muscle-listener"
    assert pod["containers"][0]["image"] == "mirror.hospital:5000/thighseg/listener:0.1.0"
    assert pod["serviceAccountName"] == "muscle-sa"
    assert by_kind(docs, "ServiceAccount")[0]["metadata"]["name"] == "muscle-sa"
    assert "runAsUser" not in pod["securityContext"]  # OpenShift assigns it
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in pod["containers"][0]["securityContext"]
    assert pod["nodeSelector"] == {"node-role": "dicom"} and pod["tolerations"][0]["key"] == "dicom"
    assert "nodeAffinity" in pod["affinity"]
    annotations = listener["spec"]["template"]["metadata"]["annotations"]
    assert annotations["backup.velero.io/backup-volumes"] == "spool"
    assert {"name": "TZ", "value": "Europe/Berlin"} in pod["containers"][0]["env"]
    assert "volumeClaimTemplates" not in listener["spec"]
    assert {"name": "spool", "persistentVolumeClaim": {"claimName": "dicom-spool"}} in pod[
        "volumes"
    ]
    triton = container(docs, "Deployment")
    assert triton["image"].startswith("mirror.hospital:5000/thighseg/triton")
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in triton["env"]


def test_value_sets_change_what_they_should():
    gpu_off = container(render(VALUE_SETS["gpu_off"]), "Deployment")
    assert "nvidia.com/gpu" not in gpu_off["resources"]["limits"]
    assert {"name": "MODEL_CONFIG_NAME", "value": "cpu"} in gpu_off["env"]
    tls = render(VALUE_SETS["tls_on"])
    args = container(tls, "StatefulSet")["args"]
    assert (
        "--tls-cert=/etc/thighseg/tls/tls.crt" in args
        and "--tls-ca=/etc/thighseg/tls/ca.crt" in args
    )
    assert "--allow-aet=CT_SCANNER" in args
    hpa = by_kind(render(VALUE_SETS["autoscaling_queue"]), "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["metrics"][0]["type"] == "Pods"
    assert "replicas" not in by_kind(render(VALUE_SETS["autoscaling_cpu"]), "Deployment")[0]["spec"]
    external = container(render(VALUE_SETS["external_model_store"]), "Deployment")
    assert {"name": "MODEL_REPOSITORY", "value": "s3://hospital-models/thighseg"} in external["env"]
    assert {
        "name": "cloud-credentials",
        "mountPath": "/etc/thighseg/cloud",
        "readOnly": True,
    } in external["volumeMounts"]
    monitoring = render(VALUE_SETS["monitoring"])
    dashboard = json.loads(by_kind(monitoring, "ConfigMap")[0]["data"]["thighseg.json"])
    assert any(
        "thighseg_stage_seconds" in t["expr"] for p in dashboard["panels"] for t in p["targets"]
    )
    assert by_kind(monitoring, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] == "metrics"
    assert "@sha256:" in container(render(VALUE_SETS["nodeport_pinned"]), "Deployment")["image"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"listener": {"tls": {"enabled": True}}}, "secretName"),
        ({"triton": {"modelRepository": {"source": "pvc"}}}, "claimName"),
        ({"model": "unet"}, "model"),
        ({"modelVersion": "newest"}, "modelVersion"),
        ({"listener": {"forward": ["PACS@pacs:104/pdf"]}}, "forward"),
        ({"listener": {"forward": ["https://vna/dicom-web#pdf"]}}, "forward"),
        ({"listener": {"port": 70000}}, "port"),
        ({"listener": {"replicas": 2, "spool": {"existingClaim": "shared"}}}, "spool per pod"),
    ],
)
def test_invalid_values_are_refused_with_a_reason(values, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


def _checkov() -> str | None:
    local = REPO_ROOT / ".venv-tools" / "bin" / "checkov"
    return str(local) if local.exists() else shutil.which("checkov")


@pytest.mark.skipif(
    _checkov() is None, reason="checkov not installed (scripts/setup.sh installs it)"
)
def test_checkov_finds_nothing_unjustified(tmp_path):
    justified = yaml.safe_load((CHART / "checkov-justifications.yaml").read_text())
    for name, values in VALUE_SETS.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(render(values)))
    result = subprocess.run(
        [
            _checkov(),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout)
    failed = [
        (c["check_id"], c["resource"], Path(c["file_path"]).stem)
        for r in (report if isinstance(report, list) else [report])
        for c in r["results"]["failed_checks"]
    ]
    # on OpenShift the platform assigns a high UID itself; the chart leaves runAsUser out there
    openshift = {("CKV_K8S_40", "cluster_admin")}
    unjustified = [f for f in failed if f[0] not in justified and (f[0], f[2]) not in openshift]
    assert unjustified == []
    assert not [f for f in failed if f[2] == "nodeport_pinned"], (
        "pinned digests must pass every check"
    )


def test_chart_defaults_are_the_listeners_own():
    """One source for every default: the chart's listener values equal the code's."""
    from thighseg.cli import build_parser
    from thighseg.core.constants import AE_TITLE, DEFAULT_MODEL, DICOM_PORT, LISTENER_METRICS_PORT
    from thighseg.dicom_listener.config import default

    listener = yaml.safe_load((CHART / "values.yaml").read_text())["listener"]
    assert (listener["aeTitle"], listener["port"], listener["metricsPort"]) == (
        AE_TITLE,
        DICOM_PORT,
        LISTENER_METRICS_PORT,
    )
    assert (listener["idleSeconds"], listener["workers"]) == (default("idle_s"), default("workers"))
    assert listener["ingestProcesses"] == default("ingest_processes")
    assert listener["segProcess"] == default("seg_process")
    assert listener["headStart"] == default("head_start")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (values["model"], values["modelVersion"]) == (DEFAULT_MODEL, "latest")
    args = container(render({}), "StatefulSet")["args"]
    assert f"--model={DEFAULT_MODEL}" in args and "--model-version=latest" in args
    assert f"--ingest-processes={default('ingest_processes')}" in args
    assert "--seg-in-listener" not in args
    in_listener = container(render({"listener": {"segProcess": False}}), "StatefulSet")["args"]
    assert "--seg-in-listener" in in_listener
    assert "--no-head-start" not in args
    late = container(render({"listener": {"headStart": False}}), "StatefulSet")["args"]
    assert "--no-head-start" in late
    listen = build_parser().parse_args(["listen"])
    assert f"--tta={listen.tta}" in args  # the CLI's default
    flipped = container(render({"listener": {"tta": "flip"}}), "StatefulSet")["args"]
    assert "--tta=flip" in flipped
    chosen = ["PACS@pacs:104", "ARCHIVE@archive:11112/seg,sr", "https://vna/dicom-web#seg"]
    args = container(render({"listener": {"forward": chosen}}), "StatefulSet")["args"]
    assert all(f"--forward={text}" in args for text in chosen)


def test_dashboard_queries_metrics_the_listener_exports_and_averages_without_a_floor():
    import re

    from dicom_listener.telemetry import Telemetry

    dashboard = json.loads((CHART / "dashboards" / "thighseg.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exported = {family.name for family in Telemetry().registry.collect()}
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for expr in expressions
        for name in re.findall(r"thighseg_\w+", expr)
    }
    assert queried and queried <= exported, queried - exported
    # a per-request average must divide by the real request rate: a floor of 1 request/s would
    # under-read the queue time whenever traffic is lighter than that
    queue = next(e for e in expressions if "nv_inference_queue_duration_us" in e)
    assert "clamp_min" not in queue and "> 0" in queue


def test_listener_replicas_keep_each_sender_on_one_pod_with_its_own_spool():
    scaled = render(VALUE_SETS["listener_scaled"])
    statefulset = by_kind(scaled, "StatefulSet")[0]
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "spool"
    dicom = next(s for s in by_kind(scaled, "Service") if s["metadata"]["name"].endswith("-dicom"))
    assert dicom["spec"]["sessionAffinity"] == "ClientIP"
    assert dicom["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] == 10800
    assert dicom["spec"]["externalTrafficPolicy"] == "Local"  # the sender's own address
    single = next(
        s for s in by_kind(render({}), "Service") if s["metadata"]["name"].endswith("-dicom")
    )
    assert "sessionAffinity" not in single["spec"]
