"""Alert rules, their PrometheusRule copy and the Grafana dashboard.

Runs the real promtool (``promtool check rules``, ``promtool test rules``) and
checks that every metric the rules and the dashboard query is one the exporter
exports: CONTRACT_METRICS below is that contract, kept here in one place for the
exporter's tests to import.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "capwatch.rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "capwatch.rules.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "prometheus" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "capwatch-dashboard.json"

#: The exporter's metrics and their labels: the contract between `capwatch serve`
#: and everything under deploy/. Prometheus adds job and instance when scraping.
CONTRACT_METRICS: dict[str, frozenset[str]] = {
    "capwatch_checks_total": frozenset(
        {"capability", "verdict", "namespace", "pod", "container", "runtime"}
    ),
    "capwatch_denials_total": frozenset(
        {"capability", "namespace", "pod", "container", "runtime", "expected"}
    ),
    "capwatch_events_lost_total": frozenset({"ring"}),
    "capwatch_denials_suppressed_total": frozenset(),
    "capwatch_series_folded_total": frozenset(),
    "capwatch_decode_errors_total": frozenset(),
    "capwatch_attached": frozenset(),
    "capwatch_attach_info": frozenset({"mode"}),
    "capwatch_build_info": frozenset({"version"}),
    "capwatch_ringbuf_consumer_lag_seconds": frozenset(),
    "capwatch_scrape_duration_seconds": frozenset(),
    "capwatch_checks_uncounted_total": frozenset(),
    "capwatch_denials_unclassified_total": frozenset(
        {"capability", "namespace", "pod", "container", "runtime"}
    ),
    "capwatch_denials_uncounted_total": frozenset(),
    "capwatch_map_evictions_total": frozenset({"map"}),
    "capwatch_count_reads_partial_total": frozenset(),
    "capwatch_map_read_errors_total": frozenset(),
}
SCRAPE_LABELS = frozenset({"job", "instance"})

_METRIC = re.compile(r"capwatch_[a-z_]+")
_SELECTOR = re.compile(r"(capwatch_[a-z_]+)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


def metric_names(expr: str) -> set[str]:
    """Every capwatch_* name an expression mentions."""
    return set(_METRIC.findall(expr))


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Label names matched in each capwatch_* selector of an expression."""
    out: dict[str, set[str]] = {}
    for name, body in _SELECTOR.findall(expr):
        out.setdefault(name, set()).update(_MATCHER_LABEL.findall(body))
    return out


def contract_violations(expr: str) -> list[str]:
    problems = [f"unknown metric {m}" for m in sorted(metric_names(expr) - CONTRACT_METRICS.keys())]
    for name, labels in selector_labels(expr).items():
        allowed = CONTRACT_METRICS.get(name, frozenset()) | SCRAPE_LABELS
        problems += [f"{name} has no label {lab!r}" for lab in sorted(labels - allowed)]
    return problems


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    return [r for g in _load_yaml(RULES)["groups"] for r in g["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [r for r in _rules() if "alert" in r]


def _prometheus_rule_copies() -> list[Path]:
    found = []
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError:
            continue  # templated manifests are not plain YAML
        if any(isinstance(d, dict) and d.get("kind") == "PrometheusRule" for d in docs):
            found.append(path)
    return found


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def _as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in, as plain PromQL."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$[a-z_]+", ".*", expr)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


class TestPromtool:
    def test_rules_file_passes_promtool_check(self) -> None:
        """`promtool check rules` accepts the rules file."""
        result = _run("check", "rules", str(RULES))
        assert 0 == result.returncode, result.stdout + result.stderr

    def test_rule_unit_tests_pass(self) -> None:
        """Every promtool unit test in capwatch.rules.test.yml passes."""
        result = _run("test", "rules", str(RULES_TEST))
        assert 0 == result.returncode, result.stdout + result.stderr

    def test_check_rejects_a_broken_expression(self, tmp_path: Path) -> None:
        """The check is real: an expression with a syntax error fails it."""
        doc = _load_yaml(RULES)
        doc["groups"][1]["rules"][0]["expr"] = "sum by (namespace (capwatch_denials_total"
        broken = tmp_path / "broken.rules.yml"
        broken.write_text(yaml.safe_dump(doc), encoding="utf-8")
        result = _run("check", "rules", str(broken))
        assert 0 != result.returncode

    @pytest.mark.slow
    @pytest.mark.parametrize(
        ("what", "old", "new"),
        [
            # Without the `up offset 5m` guard a restarted Prometheus calls old series new.
            pytest.param(
                "restart guard",
                '(up{job="capwatch"} offset 5m == 1)',
                '(up{job="capwatch"} == 1)',
                id="restart-guard",
            ),
            # Without the new-series branch the first denial of a workload is missed.
            pytest.param(
                "first-denial branch",
                'capwatch_denials_total{expected="false"} offset 5m\n',
                'capwatch_denials_total{expected="false"}\n',
                id="first-denial-branch",
            ),
            pytest.param(
                "lag threshold",
                "capwatch_ringbuf_consumer_lag_seconds > 5",
                "capwatch_ringbuf_consumer_lag_seconds > 50",
                id="lag-threshold",
            ),
        ],
    )
    def test_unit_tests_catch_a_mutated_rule(
        self, tmp_path: Path, what: str, old: str, new: str
    ) -> None:
        """The promtool tests fail when a rule loses one of its parts."""
        text = RULES.read_text(encoding="utf-8")
        assert old in text, f"mutation {what!r} no longer applies"
        (tmp_path / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
        shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
        result = _run("test", "rules", str(tmp_path / RULES_TEST.name))
        assert 0 != result.returncode, f"mutation {what!r} went unnoticed"

    def test_dashboard_queries_are_valid_promql(self, tmp_path: Path) -> None:
        """Every dashboard query (Grafana variables filled in) parses as PromQL."""
        exprs = [_as_promql(e) for e in _dashboard_exprs() if not e.startswith("label_values(")]
        rules = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
        path = tmp_path / "dashboard.rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}), "utf-8")
        result = _run("check", "rules", str(path))
        assert 0 == result.returncode, result.stdout + result.stderr


class TestAlertDefinitions:
    @pytest.mark.parametrize("alert", _alerts(), ids=lambda a: str(a["alert"]))
    def test_alert_has_severity_summary_and_description(self, alert: dict[str, Any]) -> None:
        """Each alert carries a severity label and summary/description annotations."""
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description"} <= alert["annotations"].keys()

    @pytest.mark.parametrize("alert", _alerts(), ids=lambda a: str(a["alert"]))
    def test_alert_is_tested_firing_and_not_firing(self, alert: dict[str, Any]) -> None:
        """capwatch.rules.test.yml checks each alert both firing and quiet."""
        cases = [
            case
            for test in _load_yaml(RULES_TEST)["tests"]
            for case in test.get("alert_rule_test", [])
            if case["alertname"] == alert["alert"]
        ]
        assert (True, True) == (
            any(c["exp_alerts"] for c in cases),
            any(not c["exp_alerts"] for c in cases),
        )

    def test_issue_alerts_exist(self) -> None:
        """Unexpected, new, lost-events and exporter-down alerts are all defined."""
        names = {a["alert"] for a in _alerts()}
        required = {
            "CapwatchUnexpectedDenial",
            "CapwatchNewDenial",
            "CapwatchEventsLost",
            "CapwatchExporterDown",
            "CapwatchConsumerLag",
        }
        assert required == required & names


class TestPrometheusRule:
    def test_groups_equal_the_plain_rules_file(self) -> None:
        """The PrometheusRule's spec.groups are exactly the rules file's groups."""
        assert _load_yaml(RULES)["groups"] == _load_yaml(PROMETHEUS_RULE)["spec"]["groups"]

    @pytest.mark.parametrize(
        "path", _prometheus_rule_copies(), ids=lambda p: str(p.relative_to(ROOT))
    )
    def test_every_copy_under_deploy_has_the_same_groups(self, path: Path) -> None:
        """Any other PrometheusRule under deploy/ (e.g. a kustomize base) matches too."""
        assert _load_yaml(RULES)["groups"] == _load_yaml(path)["spec"]["groups"]

    def test_is_a_prometheus_operator_resource(self) -> None:
        """apiVersion and kind are the Prometheus Operator's."""
        doc = _load_yaml(PROMETHEUS_RULE)
        assert ("monitoring.coreos.com/v1", "PrometheusRule", "capwatch") == (
            doc["apiVersion"],
            doc["kind"],
            doc["metadata"]["name"],
        )


class TestMetricContract:
    @pytest.mark.parametrize("rule", _rules(), ids=lambda r: str(r.get("alert", r.get("record"))))
    def test_rules_use_only_exported_metrics(self, rule: dict[str, Any]) -> None:
        """Rule expressions name only metrics and labels the exporter exports."""
        assert [] == contract_violations(rule["expr"])

    @pytest.mark.parametrize("expr", _dashboard_exprs())
    def test_dashboard_uses_only_exported_metrics(self, expr: str) -> None:
        """Dashboard queries name only metrics and labels the exporter exports."""
        assert [] == contract_violations(expr)

    def test_every_dashboard_query_names_a_capwatch_metric(self) -> None:
        """No query is left that the contract check would not look at."""
        missing = [e for e in _dashboard_exprs() if not metric_names(e) and "up{" not in e]
        assert [] == missing

    @pytest.mark.parametrize(
        ("expr", "expected"),
        [
            ("rate(capwatch_denials_totl[5m])", ["unknown metric capwatch_denials_totl"]),
            (
                'capwatch_checks_total{verdict="denied", pid="1"}',
                ["capwatch_checks_total has no label 'pid'"],
            ),
            ('capwatch_events_lost_total{ring=~"d.*", instance="x"}', []),
            ('sum by (ring) (up{job="capwatch"})', []),
        ],
    )
    def test_contract_check_flags_unknown_names(self, expr: str, expected: list[str]) -> None:
        """The checker itself reports misspelt metrics and unknown labels."""
        assert expected == contract_violations(expr)


class TestDashboard:
    def test_schema_and_datasource_variable(self) -> None:
        """schemaVersion 38 and a Prometheus datasource template variable."""
        dash = _dashboard()
        ds = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        assert (38, ["prometheus"]) == (dash["schemaVersion"], [v["query"] for v in ds])

    def test_every_panel_and_target_uses_the_templated_datasource(self) -> None:
        """No panel is pinned to one Grafana's datasource uid."""
        uids = {p["datasource"]["uid"] for p in _dashboard()["panels"]}
        uids |= {t["datasource"]["uid"] for p in _dashboard()["panels"] for t in p["targets"]}
        assert {"${datasource}"} == uids

    def test_panel_ids_are_unique_and_panels_do_not_overlap(self) -> None:
        """Grafana needs unique ids; overlapping gridPos hides panels."""
        panels = _dashboard()["panels"]
        assert len(panels) == len({p["id"] for p in panels})
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            area = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert set() == cells & area, p["title"]
            assert g["x"] + g["w"] <= 24, p["title"]
            cells |= area

    @pytest.mark.parametrize(
        "metric",
        [
            "capwatch_denials_total",
            "capwatch_checks_total",
            "capwatch_events_lost_total",
            "capwatch_denials_suppressed_total",
            "capwatch_ringbuf_consumer_lag_seconds",
        ],
    )
    def test_dashboard_shows_metric(self, metric: str) -> None:
        """Denials, checks, losses, suppression and lag each have a panel."""
        assert any(metric in metric_names(e) for e in _dashboard_exprs())
