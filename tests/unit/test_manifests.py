"""deploy/: the kustomize overlays build, every object validates offline, and the
DaemonSet has what a node agent needs.

* Core kinds validate against the Kubernetes OpenAPI schemas shipped inside the
  ``kubernetes-validate`` package (no network), strictly (unknown fields fail).
* ServiceMonitor and PrometheusRule are Prometheus Operator CRDs, absent from
  those schemas: they validate against JSON schemas written below from the
  operator's documented fields (monitoring.coreos.com/v1 API reference).
* Overlays are built with ``kubectl kustomize`` (or a ``kustomize`` binary).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ("privileged", "least-privilege")
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
#: Oldest Kubernetes release still commonly run, and the newest the package knows.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())
PORT = 9649


# --- building -----------------------------------------------------------------


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@cache
def build(overlay: str) -> tuple[dict[str, Any], ...]:
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot build the overlays")
    r = subprocess.run(
        [*cmd, str(KUBE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == r.returncode, r.stderr
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert 1 == len(found), f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(overlay: str) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(build(overlay), "DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(overlay: str) -> dict[str, Any]:
    c: dict[str, Any] = pod_spec(overlay)["containers"][0]
    return c


# --- CRD schemas (written from the Prometheus Operator API reference) ---------

_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                *(a for b in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop")
                  for a in (b, b.capitalize())),
                *(a for b in ("labelkeep", "lowercase", "uppercase", "keepequal", "dropequal")
                  for a in (b, b.capitalize())),
            ]
        },
    },
}  # fmt: skip
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
}
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "params": {"type": "object"},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                            "tlsConfig": {"type": "object"},
                            "bearerTokenSecret": {"type": "object"},
                            # deprecated for `authorization`, still what kube-prometheus
                            # uses to scrape through kube-rbac-proxy
                            "bearerTokenFile": {"type": "string", "pattern": "^/"},
                            "authorization": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "properties": {
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string", "pattern": _DURATION},
        "keep_firing_for": {"type": "string", "pattern": _DURATION},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
}
PROMETHEUSRULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "query_offset": {"type": "string", "pattern": _DURATION},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "labels": _STR_MAP,
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}
CRD_SCHEMAS = {"ServiceMonitor": SERVICEMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}


# --- tests --------------------------------------------------------------------


class TestKustomizeBuild:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_overlay_builds_every_object(self, overlay: str) -> None:
        """Each overlay builds and yields the full set of objects, once each."""
        kinds = sorted(d["kind"] for d in build(overlay))
        assert [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "NetworkPolicy",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ] == kinds

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_namespaced_objects_live_in_capwatch(self, overlay: str) -> None:
        """Everything but the cluster-scoped kinds is in the capwatch namespace."""
        cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
        namespaces = {
            d["metadata"].get("namespace")
            for d in build(overlay)
            if d["kind"] not in cluster_scoped
        }
        assert {"capwatch"} == namespaces

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_image_tag_is_the_project_version(self, overlay: str) -> None:
        """The image tag follows pyproject's version (an upgrade bumps both)."""
        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        assert f"capwatch:{version}" == container(overlay)["image"]


class TestKubernetesSchemas:
    @pytest.mark.parametrize("version", K8S_VERSIONS)
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_core_objects_validate_strictly(self, overlay: str, version: str) -> None:
        """Every non-CRD object validates against the offline schemas, unknown fields refused."""
        for doc in build(overlay):
            if doc["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(doc, version, strict=True)

    @pytest.mark.parametrize(
        ("path", "value"),
        [
            (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "9649"),
            (("spec", "template", "spec", "hostPid"), True),  # misspelt field
            (("spec", "template", "spec", "tolerations", 0, "operator"), 7),
        ],
    )
    def test_a_broken_daemonset_is_refused(self, path: tuple[Any, ...], value: Any) -> None:
        """The validation bites: a wrong type or an unknown field fails."""
        import copy

        doc = copy.deepcopy(by_kind(build("privileged"), "DaemonSet"))
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


class TestCrdShapes:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    @pytest.mark.parametrize("kind", sorted(CRD_KINDS))
    def test_crd_objects_match_the_documented_fields(self, overlay: str, kind: str) -> None:
        """ServiceMonitor and PrometheusRule match schemas written from the operator's docs."""
        jsonschema.validate(by_kind(build(overlay), kind), CRD_SCHEMAS[kind])

    @pytest.mark.parametrize(
        ("kind", "mutate"),
        [
            ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="30s")),
            ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 s")),
            ("ServiceMonitor", lambda d: d["spec"].pop("selector")),
            ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr")),
            (
                "PrometheusRule",
                lambda d: d["spec"]["groups"][1]["rules"][0].update(record="x:y"),
            ),  # both alert and record
            ("PrometheusRule", lambda d: d["spec"]["groups"][1]["rules"][0].update(**{"for": "5"})),
        ],
    )
    def test_the_crd_schemas_bite(self, kind: str, mutate: Any) -> None:
        """Misspelt fields, bad durations, missing required fields are refused."""
        import copy

        doc = copy.deepcopy(by_kind(build("privileged"), kind))
        mutate(doc)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, CRD_SCHEMAS[kind])

    def test_prometheusrule_is_the_alerting_helpers_file(self) -> None:
        """base/prometheusrule.yaml is a byte-for-byte copy of deploy/prometheus/prometheusrule.yaml.

        kustomize refuses files outside a kustomization's directory, hence the copy.
        """
        source = (DEPLOY / "prometheus" / "prometheusrule.yaml").read_bytes()
        assert source == (KUBE / "base" / "prometheusrule.yaml").read_bytes()


class TestDaemonSet:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_node_name_comes_from_the_downward_api(self, overlay: str) -> None:
        """NODE_NAME is spec.nodeName."""
        env = {e["name"]: e for e in container(overlay)["env"]}
        assert {"fieldRef": {"fieldPath": "spec.nodeName"}} == env["NODE_NAME"]["valueFrom"]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_tolerates_every_taint(self, overlay: str) -> None:
        """A toleration with operator Exists and no key matches every taint."""
        assert {"operator": "Exists"} in pod_spec(overlay)["tolerations"]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_requests_and_limits_are_set_and_ordered(self, overlay: str) -> None:
        """cpu and memory have requests no larger than their limits."""
        res = container(overlay)["resources"]
        for what in ("cpu", "memory"):
            assert _quantity(res["requests"][what]) <= _quantity(res["limits"][what])

    @pytest.mark.parametrize("overlay", OVERLAYS)
    @pytest.mark.parametrize("probe", ["startupProbe", "livenessProbe", "readinessProbe"])
    def test_probes_hit_healthz_on_the_metrics_port(self, overlay: str, probe: str) -> None:
        """Every probe is an HTTP GET of /healthz on the port capwatch listens on."""
        c = container(overlay)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        get = c[probe]["httpGet"]
        assert ("/healthz", PORT) == (get["path"], ports.get(get["port"], get["port"]))

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_arguments_match_ports_and_mounts(self, overlay: str) -> None:
        """--listen is on all addresses at the container port; --proc-root is the host /proc mount."""
        c = container(overlay)
        assert ["--listen=0.0.0.0:9649", "--proc-root=/host/proc"] == c["args"]
        assert [PORT] == [p["containerPort"] for p in c["ports"]]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_host_pid_namespace(self, overlay: str) -> None:
        """hostPID: pids from the kernel are the pids under /host/proc; no host network."""
        spec = pod_spec(overlay)
        assert (True, None) == (spec.get("hostPID"), spec.get("hostNetwork"))

    @pytest.mark.parametrize(
        ("host_path", "mount_path", "read_only"),
        [
            ("/sys/kernel/tracing", "/sys/kernel/tracing", {"privileged": None, "least-privilege": True}),
            ("/sys/kernel/debug", "/sys/kernel/debug", {"privileged": None, "least-privilege": True}),
            ("/sys/fs/cgroup", "/sys/fs/cgroup", True),
            ("/proc", "/host/proc", True),
            ("/lib/modules", "/host/lib/modules", True),
            ("/usr/src", "/host/usr/src", True),
        ],
    )  # fmt: skip
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_host_mounts(
        self, overlay: str, host_path: str, mount_path: str, read_only: Any
    ) -> None:
        """Each host directory capwatch reads is mounted where it looks, read-only where it can be."""
        expected_ro = read_only[overlay] if isinstance(read_only, dict) else read_only
        spec = pod_spec(overlay)
        vols = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        m = mounts[mount_path]
        assert (host_path, expected_ro) == (vols[m["name"]], m.get("readOnly"))

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_writable_dirs_are_empty_dirs(self, overlay: str) -> None:
        """/run/capwatch (CAPWATCH_WORK_DIR) and /tmp are emptyDirs, so the root can be read-only."""
        spec = pod_spec(overlay)
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        c = spec["containers"][0]
        mounted = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty}
        work = {e["name"]: e.get("value") for e in c["env"]}["CAPWATCH_WORK_DIR"]
        assert ({"/run/capwatch", "/tmp"}, "/run/capwatch") == (mounted, work)


class TestWiring:
    def test_service_selects_the_pods_and_names_the_port(self) -> None:
        """The Service selects the DaemonSet's pods and targets its metrics port by name."""
        docs = build("privileged")
        svc, ds = by_kind(docs, "Service"), by_kind(docs, "DaemonSet")
        pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        port_names = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names

    def test_servicemonitor_scrapes_the_service_as_job_capwatch(self) -> None:
        """The ServiceMonitor selects the Service, its port, and yields job="capwatch" for the alerts."""
        docs = build("privileged")
        svc, sm = by_kind(docs, "Service"), by_kind(docs, "ServiceMonitor")
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {
            p["name"] for p in svc["spec"]["ports"]
        }
        job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
        rules = yaml.safe_dump(by_kind(docs, "PrometheusRule")["spec"])
        assert ("capwatch", True) == (job, 'job="capwatch"' in rules)

    def test_rbac_reads_pods_only_for_the_daemonset_account(self) -> None:
        """The ClusterRole allows get/list/watch on pods and get on ReplicaSets and Jobs
        (a pod's Deployment or CronJob, for --profiles), bound to the DaemonSet's account."""
        docs = build("privileged")
        role, binding = by_kind(docs, "ClusterRole"), by_kind(docs, "ClusterRoleBinding")
        sa, ds = by_kind(docs, "ServiceAccount"), by_kind(docs, "DaemonSet")
        assert [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
        ] == role["rules"]
        assert role["metadata"]["name"] == binding["roleRef"]["name"]
        subject = {
            "kind": "ServiceAccount",
            "name": sa["metadata"]["name"],
            "namespace": "capwatch",
        }
        assert [subject] == binding["subjects"]
        assert sa["metadata"]["name"] == ds["spec"]["template"]["spec"]["serviceAccountName"]


def _admitted(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, str]]:
    """(namespace, port) pairs the NetworkPolicy admits to the capwatch pods."""
    pol, ds = by_kind(docs, "NetworkPolicy"), by_kind(docs, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert ["Ingress"] == pol["spec"]["policyTypes"]
    out = []
    for rule in pol["spec"]["ingress"]:
        for peer in rule["from"]:
            assert ["namespaceSelector"] == list(peer)  # no ipBlock, no bare podSelector
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            out += [(ns, p["port"]) for p in rule["ports"]]
    return out


class TestNetworkPolicy:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_only_the_prometheus_namespace_reaches_the_metrics_port(self, overlay: str) -> None:
        """Ingress to capwatch pods: from the monitoring namespace, to the metrics port only."""
        docs = build(overlay)
        assert [("monitoring", "metrics")] == _admitted(docs)
        ports = {p["name"] for p in container(overlay)["ports"]}
        assert "metrics" in ports


PROXY = "kube-rbac-proxy"


class TestKubeRbacProxy:
    """overlays/kube-rbac-proxy: capwatch on loopback, TLS + SubjectAccessReview in front."""

    def _containers(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in pod_spec(PROXY)["containers"]}

    def test_builds_and_validates(self) -> None:
        """Every core object validates strictly on both Kubernetes versions; CRDs match."""
        docs = build(PROXY)
        for version in K8S_VERSIONS:
            for doc in docs:
                if doc["kind"] not in CRD_KINDS:
                    kubernetes_validate.validate(doc, version, strict=True)
        for kind in sorted(CRD_KINDS):
            jsonschema.validate(by_kind(docs, kind), CRD_SCHEMAS[kind])

    def test_capwatch_listens_on_loopback_behind_the_proxy(self) -> None:
        """capwatch binds 127.0.0.1 with no pod port; the proxy's upstream is that address."""
        cs = self._containers()
        assert ["capwatch", PROXY] == list(cs)
        cw, proxy = cs["capwatch"], cs[PROXY]
        assert "--listen=127.0.0.1:9649" in cw["args"]
        assert "ports" not in cw
        assert "--upstream=http://127.0.0.1:9649/" in proxy["args"]
        assert [{"name": "https-metrics", "containerPort": 8443, "protocol": "TCP"}] == proxy[
            "ports"
        ]
        assert "--secure-listen-address=0.0.0.0:8443" in proxy["args"]
        sc = proxy["securityContext"]
        assert (True, False, ["ALL"]) == (
            sc["runAsNonRoot"],
            sc["allowPrivilegeEscalation"],
            sc["capabilities"]["drop"],
        )

    @pytest.mark.parametrize("probe", ["startupProbe", "livenessProbe", "readinessProbe"])
    def test_probes_reach_healthz_through_the_proxy_unauthenticated(self, probe: str) -> None:
        """The kubelet probes /healthz over HTTPS on the proxy port; only /healthz skips auth."""
        cs = self._containers()
        assert {"path": "/healthz", "port": "https-metrics", "scheme": "HTTPS"} == cs["capwatch"][
            probe
        ]["httpGet"]
        assert "--ignore-paths=/healthz" in cs[PROXY]["args"]

    def test_service_monitor_and_policy_use_the_tls_port(self) -> None:
        """Service, ServiceMonitor (https + the service-account token) and NetworkPolicy
        all point at the proxy's port, never at capwatch's."""
        docs = build(PROXY)
        svc, sm = by_kind(docs, "Service"), by_kind(docs, "ServiceMonitor")
        assert [("https-metrics", "https-metrics")] == [
            (p["name"], p["targetPort"]) for p in svc["spec"]["ports"]
        ]
        ep = sm["spec"]["endpoints"][0]
        assert ("https-metrics", "https", "/metrics") == (ep["port"], ep["scheme"], ep["path"])
        assert ep["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
        assert [("monitoring", "https-metrics")] == _admitted(docs)

    def test_rbac_for_reviews_and_for_reading_metrics(self) -> None:
        """The DaemonSet's account may create token and access reviews; Prometheus's
        account may GET /metrics; nothing more is added."""
        docs = build(PROXY)
        roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
        bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRoleBinding"}
        assert [
            {
                "apiGroups": ["authentication.k8s.io"],
                "resources": ["tokenreviews"],
                "verbs": ["create"],
            },
            {
                "apiGroups": ["authorization.k8s.io"],
                "resources": ["subjectaccessreviews"],
                "verbs": ["create"],
            },
        ] == roles["capwatch-kube-rbac-proxy"]["rules"]
        assert [
            {"kind": "ServiceAccount", "name": "capwatch", "namespace": "capwatch"}
        ] == bindings["capwatch-kube-rbac-proxy"]["subjects"]
        assert [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}] == roles[
            "capwatch-metrics-reader"
        ]["rules"]
        assert [
            {"kind": "ServiceAccount", "name": "prometheus-k8s", "namespace": "monitoring"}
        ] == bindings["capwatch-metrics-reader"]["subjects"]
        for name, b in bindings.items():
            assert name == b["roleRef"]["name"]


class TestSecurityVariants:
    def test_privileged(self) -> None:
        """The privileged overlay runs privileged as root."""
        assert {"privileged": True, "runAsUser": 0} == container("privileged")["securityContext"]

    def test_least_privilege(self) -> None:
        """drop ALL, add BPF and PERFMON only, read-only root, no escalation, uid 0."""
        sc = container("least-privilege")["securityContext"]
        assert {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"drop": ["ALL"], "add": ["BPF", "PERFMON"]},
            "seccompProfile": {"type": "Unconfined"},
        } == sc

    def test_each_added_capability_says_why(self) -> None:
        """Every capability the least-privilege overlay adds carries a comment on its line."""
        text = (KUBE / "overlays" / "least-privilege" / "kustomization.yaml").read_text()
        added = container("least-privilege")["securityContext"]["capabilities"]["add"]
        commented = set(re.findall(r"^\s*- ([A-Z_]+)\s+#\s*\S", text, re.MULTILINE))
        assert added
        assert set() == set(added) - commented


class _Entrypoint:
    """Runs deploy/entrypoint.sh against a fake host tree with a fake capwatch."""

    def __init__(self, tmp: Path) -> None:
        self.fake = tmp / "fake-capwatch"
        self.fake.write_text(
            '#!/bin/sh\necho "HEADERS=${CAPWATCH_KERNEL_HEADERS:-}"\nfor a; do echo "$a"; done\n'
        )
        self.fake.chmod(0o755)
        self.host = tmp / "host"
        self.host.mkdir()

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
        """(CAPWATCH_KERNEL_HEADERS as capwatch would see it, capwatch's argv)."""
        full_env = {
            "PATH": os.environ["PATH"],
            "CAPWATCH_BIN": str(self.fake),
            "CAPWATCH_HOST_ROOT": str(self.host),
            "CAPWATCH_KERNEL_RELEASE": "6.1.0-56-amd64",
            **(env or {}),
        }
        r = subprocess.run(
            ["sh", str(DEPLOY / "entrypoint.sh"), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=10,
            check=True,
        )
        lines = r.stdout.splitlines()
        return lines[0].removeprefix("HEADERS="), lines[1:]


class TestEntrypoint:
    """deploy/entrypoint.sh: host header lookup under /host and the command line."""

    @pytest.fixture
    def run(self, tmp_path: Path) -> _Entrypoint:
        return _Entrypoint(tmp_path)

    @staticmethod
    def _tree(d: Path) -> None:
        (d / "include" / "linux").mkdir(parents=True)
        (d / "include" / "linux" / "kconfig.h").touch()

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            ((), ["serve"]),
            (("--listen=0.0.0.0:9649",), ["serve", "--listen=0.0.0.0:9649"]),
            (("decode", "0x1"), ["decode", "0x1"]),
            (("doctor",), ["doctor"]),
            (("--version",), ["--version"]),
        ],
    )
    def test_command_line(
        self, run: _Entrypoint, args: tuple[str, ...], expected: list[str]
    ) -> None:
        """No arguments or options run serve; a command runs that command."""
        assert expected == run(*args)[1]

    def test_debian_split_tree_via_absolute_link(self, run: _Entrypoint) -> None:
        """build -> /usr/src/linux-headers-X-amd64 (absolute on the host) is re-rooted under /host."""
        host = run.host
        src = host / "usr/src"
        (src / "linux-headers-6.1.0-56-amd64" / "include" / "generated").mkdir(parents=True)
        self._tree(src / "linux-headers-6.1.0-56-common")
        mod = host / "lib/modules/6.1.0-56-amd64"
        mod.mkdir(parents=True)
        (mod / "build").symlink_to("/usr/src/linux-headers-6.1.0-56-amd64")
        assert str(src / "linux-headers-6.1.0-56-amd64") == run()[0]

    def test_whole_tree_via_relative_link(self, run: _Entrypoint) -> None:
        """A relative build link to a self-contained tree is followed."""
        host = run.host
        self._tree(host / "usr/src/kernels/6.1.0-56-amd64")
        mod = host / "lib/modules/6.1.0-56-amd64"
        mod.mkdir(parents=True)
        (mod / "build").symlink_to("../../../usr/src/kernels/6.1.0-56-amd64")
        assert str(host / "usr/src/kernels/6.1.0-56-amd64") == os.path.normpath(run()[0])

    @pytest.mark.parametrize("layout", ["nothing", "modules-only", "dangling-link", "not-a-tree"])
    def test_no_usable_host_tree_leaves_the_choice_to_capwatch(
        self, run: _Entrypoint, layout: str
    ) -> None:
        """Without a usable host tree nothing is set, so capwatch falls back to the shipped one."""
        host = run.host
        mod = host / "lib/modules/6.1.0-56-amd64"
        if layout != "nothing":
            mod.mkdir(parents=True)
        if layout == "dangling-link":
            (mod / "build").symlink_to("/usr/src/linux-headers-6.1.0-56-amd64")
        if layout == "not-a-tree":
            (host / "usr/src/linux-headers-6.1.0-56-amd64").mkdir(parents=True)
            (mod / "build").symlink_to("/usr/src/linux-headers-6.1.0-56-amd64")
        assert "" == run()[0]

    def test_user_setting_wins(self, run: _Entrypoint) -> None:
        """A CAPWATCH_KERNEL_HEADERS given by the user is passed through untouched."""
        host = run.host
        self._tree(host / "usr/src/kernels/x")
        (host / "lib/modules/6.1.0-56-amd64").mkdir(parents=True)
        (host / "lib/modules/6.1.0-56-amd64/build").symlink_to("/usr/src/kernels/x")
        assert "/mine" == run(env={"CAPWATCH_KERNEL_HEADERS": "/mine"})[0]


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    """A Containerfile's instructions as (KEYWORD, arguments): comment lines dropped
    (also inside a continuation, as the builder does), backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = []
    assert not pending, "the file ends inside a continuation"
    return out


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell text (a RUN instruction or a script), as word
    lists: comments dropped, continuations joined, split at ; && || | and newlines.
    Enough for the flat command lists these files hold (no quoting of separators)."""
    joined = re.sub(r"\\\n", " ", script)
    out: list[list[str]] = []
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.commenters = "#"
        lex.whitespace_split = True
        cmd: list[str] = []
        for tok in lex:
            if tok and set(tok) <= set(";&|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        if cmd:
            out.append(cmd)
    return out


def run_commands(text: str) -> list[list[str]]:
    """Every simple command of every RUN instruction of a Containerfile."""
    return [
        cmd
        for keyword, args in containerfile_instructions(text)
        if keyword == "RUN"
        for cmd in shell_commands(args)
    ]


def command_words(commands: list[list[str]], *head: str) -> list[str]:
    """The words after ``head`` in every command that starts with ``head`` (after
    a leading ``in_root``, build-rootfs.sh's chroot wrapper)."""
    out: list[str] = []
    for cmd in commands:
        words = cmd[1:] if cmd[:1] == ["in_root"] else cmd
        if tuple(words[: len(head)]) == head:
            out += words[len(head) :]
    return out


def apt_packages(commands: list[list[str]]) -> set[str]:
    """Packages installed by apt-get install or debootstrap --include=."""
    words = command_words(commands, "apt-get", "install")
    names = {w for w in words if not w.startswith("-")}
    for w in command_words(commands, "debootstrap"):
        if w.startswith("--include="):
            names |= set(w.removeprefix("--include=").split(","))
    return names


CONTAINERFILE = DEPLOY / "Containerfile"
ROOTFS_SCRIPT = DEPLOY / "build-rootfs.sh"
ENTRYPOINT = "/usr/local/bin/capwatch-entrypoint"


class TestImageDefinitionParser:
    """The parsers the image tests rely on see instructions, not comments."""

    TEXT = """\
# apt-get install -y python3-numpy
FROM debian:12-slim
RUN set -eux; \\
    # a comment line inside the continuation
    apt-get install -y --no-install-recommends python3-bpfcc; \\
    echo done  # apt-get install python3-venv
# COPY deploy/entrypoint.sh /usr/local/bin/capwatch-entrypoint
"""

    def test_comments_are_not_instructions(self) -> None:
        """Only FROM and one joined RUN; the commented-out COPY is not there."""
        keywords = [k for k, _ in containerfile_instructions(self.TEXT)]
        assert ["FROM", "RUN"] == keywords

    def test_packages_named_only_in_comments_are_not_installed(self) -> None:
        """python3-numpy and python3-venv appear only in comments: not installed."""
        assert {"python3-bpfcc"} == apt_packages(run_commands(self.TEXT))

    def test_commands_split_at_separators(self) -> None:
        """A RUN splits into its simple commands, the trailing comment dropped."""
        assert [["echo", "done"]] == [c for c in run_commands(self.TEXT) if c[0] == "echo"]


class TestImageDefinition:
    @pytest.mark.parametrize("package", ["python3-bpfcc", "python3-venv", "python3-numpy"])
    def test_image_and_offline_rootfs_install_the_same_packages(self, package: str) -> None:
        """deploy/Containerfile (apt-get install in a RUN) and deploy/build-rootfs.sh
        (debootstrap --include) install the same Debian packages."""
        image = apt_packages(run_commands(CONTAINERFILE.read_text()))
        rootfs = apt_packages(shell_commands(ROOTFS_SCRIPT.read_text()))
        assert (True, True) == (package in image, package in rootfs)
        assert image == rootfs

    @pytest.mark.parametrize(
        "commands",
        [
            pytest.param(lambda: run_commands(CONTAINERFILE.read_text()), id="Containerfile"),
            pytest.param(lambda: shell_commands(ROOTFS_SCRIPT.read_text()), id="build-rootfs.sh"),
        ],
    )
    def test_both_unpack_the_split_header_pair(self, commands: Any) -> None:
        """Both download linux-headers-X + its -common package, and unpack each .deb
        with tar --keep-directory-symlink (so /lib stays a symlink)."""
        cmds: list[list[str]] = commands()
        code = "\n".join(" ".join(c) for c in cmds)
        assert re.search(
            r"apt-cache depends \$arch_pkg\nawk /Depends: linux-headers-\.\*-common/", code
        )
        assert re.search(r"apt-get download (-\S+ )*\$arch_pkg \$common_pkg", code)
        unpack = [i for i, c in enumerate(cmds) if "--fsys-tarfile" in c]
        assert unpack
        for i in unpack:  # dpkg-deb --fsys-tarfile "$deb" | tar ...
            assert "tar" == cmds[i + 1][0]
            assert "--keep-directory-symlink" in cmds[i + 1]

    def test_image_ships_and_runs_the_entrypoint(self) -> None:
        """The image copies deploy/entrypoint.sh executable to the entrypoint path and runs it."""
        instructions = containerfile_instructions(CONTAINERFILE.read_text())
        copies = [args.split() for k, args in instructions if k == "COPY"]
        assert any(
            c[-2:] == ["deploy/entrypoint.sh", ENTRYPOINT] and "--chmod=0755" in c for c in copies
        )
        entrypoints = [args for k, args in instructions if k == "ENTRYPOINT"]
        assert [[ENTRYPOINT]] == [json.loads(e) for e in entrypoints]

    def test_rootfs_installs_the_entrypoint(self) -> None:
        """build-rootfs.sh installs deploy/entrypoint.sh executable at the entrypoint path."""
        installs = [c for c in shell_commands(ROOTFS_SCRIPT.read_text()) if c[:1] == ["install"]]
        assert any(
            "0755" in c and c[-2].endswith("/deploy/entrypoint.sh") and c[-1].endswith(ENTRYPOINT)
            for c in installs
        )

    @pytest.mark.parametrize(
        ("shell", "script"), [("bash", "build-rootfs.sh"), ("sh", "entrypoint.sh")]
    )
    def test_scripts_parse(self, shell: str, script: str) -> None:
        """The shell scripts are syntactically valid for the shell that runs them."""
        r = subprocess.run(
            [shell, "-n", str(DEPLOY / script)], capture_output=True, text=True, check=False
        )
        assert (0, "") == (r.returncode, r.stderr)


_UNITS = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}


def _quantity(q: str | int) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * _UNITS.get(m.group(2), 1.0)
