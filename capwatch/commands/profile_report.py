"""`capwatch advise --prometheus URL` and `--from-serve URL`: the least capability
set of every Kubernetes workload, from the profiles that `serve --profiles`
exports, merged over replicas and nodes (by Prometheus, or from one serve)."""

from __future__ import annotations

import argparse
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import fields
from typing import Any, TextIO, TypeVar

from capwatch.diagnose.profiles import ContainerReport, HeldSample, ProfileSample, report
from capwatch.errors import CapwatchError, UsageError

__all__ = ["from_exposition", "from_prometheus", "run_profile_report"]

T = TypeVar("T")

_TIMEOUT = 30.0


def _selector(args: argparse.Namespace) -> str:
    parts = []
    if args.namespace:
        parts.append(f'namespace="{_quote(args.namespace)}"')
    if args.workload:
        kind, sep, name = args.workload.partition("/")
        if not sep or not kind or not name:
            raise UsageError(
                f"--workload {args.workload!r}: expected KIND/NAME, e.g. Deployment/web"
            )
        parts.append(f'workload_kind="{_quote(kind)}",workload="{_quote(name)}"')
    return ",".join(parts)


def _quote(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"')


def _range(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _http_url(url: str) -> str:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UsageError(f"{url!r}: expected an http:// or https:// URL")
    return url


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    _http_url(url)
    full = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(full, timeout=_TIMEOUT) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise CapwatchError(f"Prometheus at {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CapwatchError(f"cannot query Prometheus at {url}: {reason}") from None
    except ValueError:
        raise CapwatchError(f"Prometheus at {url} did not answer with JSON") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        raise CapwatchError(f"Prometheus query failed: {str(body)[:300]}")
    result = body.get("data", {}).get("result", [])
    return [r for r in result if isinstance(r, dict)]


def _labelled(cls: type[T], labels: dict[str, str], **given: Any) -> T:
    """A sample dataclass from a series' labels (a missing label is ""), plus ``given``."""
    names = (f.name for f in fields(cls) if f.name not in given)  # type: ignore[arg-type]
    return cls(**{n: labels.get(n, "") for n in names}, **given)


def _seen(labels: dict[str, str], value: float) -> ProfileSample:
    return _labelled(ProfileSample, labels, use=labels.get("use", "needed"), last_seen=value)


def _held(labels: dict[str, str]) -> HeldSample:
    return _labelled(HeldSample, labels)


def from_prometheus(url: str, selector: str, since_s: float) -> list[ContainerReport]:
    """The reports, from Prometheus's merged view of every node's serve."""
    window = _range(since_s)
    sel = "{" + selector + "}"
    seen = _query(url, f"max_over_time(capwatch_capability_last_seen_seconds{sel}[{window}])")
    held = _query(url, f"max_over_time(capwatch_capability_held{sel}[{window}])")
    psel = "{" + ",".join(x for x in (selector, 'verdict="allowed"') if x) + "}"
    checks = _query(
        url,
        "sum by (namespace, pod, container, capability) "
        f"(max_over_time(capwatch_checks_total{psel}[{window}]))",
    )
    return report(
        [_seen(r.get("metric", {}), float(r["value"][1])) for r in seen],
        [_held(r.get("metric", {})) for r in held if float(r["value"][1]) > 0],
        {
            (
                m.get("namespace", ""),
                m.get("pod", ""),
                m.get("container", ""),
                m.get("capability", ""),
            ): float(r["value"][1])
            for r in checks
            for m in [r.get("metric", {})]
        },
    )


def from_exposition(text: str, args: argparse.Namespace) -> list[ContainerReport]:
    """The reports from one serve's /metrics (a single node, no Prometheus)."""
    from prometheus_client.parser import text_string_to_metric_families

    kind, _, name = (args.workload or "").partition("/")

    def wanted(labels: dict[str, str]) -> bool:
        if args.namespace and labels.get("namespace") != args.namespace:
            return False
        return not (
            args.workload and (labels.get("workload_kind"), labels.get("workload")) != (kind, name)
        )

    seen: list[ProfileSample] = []
    held: list[HeldSample] = []
    checks: dict[tuple[str, str, str, str], float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise CapwatchError(f"not a Prometheus exposition: {e}") from None
    for fam in families:
        for s in fam.samples:
            if s.name == "capwatch_capability_last_seen_seconds" and wanted(s.labels):
                seen.append(_seen(s.labels, s.value))
            elif s.name == "capwatch_capability_held" and s.value > 0 and wanted(s.labels):
                held.append(_held(s.labels))
            elif s.name == "capwatch_checks_total" and s.labels.get("verdict") == "allowed":
                key = (s.labels.get("namespace", ""), s.labels.get("pod", ""),
                       s.labels.get("container", ""), s.labels.get("capability", ""))  # fmt: skip
                checks[key] = checks.get(key, 0.0) + s.value
    return report(seen, held, checks)


def _fetch(url: str) -> str:
    _http_url(url)
    target = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=_TIMEOUT) as resp:
            return str(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as e:
        raise CapwatchError(f"cannot read {target}: {getattr(e, 'reason', e)}") from None


def run_profile_report(args: argparse.Namespace, out: TextIO) -> int:
    if args.prometheus:
        reports = from_prometheus(args.prometheus, _selector(args), args.since)
        source = f"Prometheus {args.prometheus}, last {args.since:.0f}s"
    else:
        _selector(args)  # validates --workload
        reports = from_exposition(_fetch(args.from_serve), args)
        source = f"serve {args.from_serve}"
    if args.json:
        out.write(
            json.dumps({"source": source, "workloads": [r.to_dict() for r in reports]}) + "\n"
        )
        return 0
    if not reports:
        out.write(
            f"no capability profiles in {source} (is serve running with --profiles,"
            " and Kubernetes metadata on?)\n"
        )
        return 0
    out.write(f"capability profiles from {source}\n")
    for r in reports:
        out.write(r.render())
    return 0
