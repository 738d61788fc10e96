"""Refusals that no capability explains, as trace --outcome sees them with one target:
refusal records through the one pipeline (capwatch.pipeline.Check), their evidence read
by trace's reader from a /proc laid out as the kernel shows it, kept per verdict in the
state file and read back by explain --last."""

from __future__ import annotations

import errno
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from capwatch.attribution.containers import Workload, classify
from capwatch.commands.trace import refusal_evidence, trace_pipeline
from capwatch.decode.events import EVENT_DTYPE, F_OUTCOME, F_REFUSAL, Batch
from capwatch.diagnose.policy import Policy
from capwatch.diagnose.refusals import Refusal
from capwatch.pipeline import Check
from capwatch.sinks.recent import RecentDenials, read_recent
from capwatch.sinks.render import JsonWriter, TableWriter
from tests.helpers import a_denial

PODMAN_ID = "5e" * 32
PODMAN_CG = 7
CLOCK_SETTIME = 227
REFUSED = F_OUTCOME | F_REFUSAL

# /proc/PID/status of `date` in a podman container with the default seccomp profile
# (Debian 12, kernel 6.18): a filter, podman's default bounding set.
STATUS = """Name:\tdate
Umask:\t0022
State:\tR (running)
Uid:\t0\t0\t0\t0
NoNewPrivs:\t0
Seccomp:\t{seccomp}
Seccomp_filters:\t{filters}
CapInh:\t0000000000000000
CapPrm:\t00000000800405fb
CapEff:\t00000000800405fb
CapBnd:\t00000000800405fb
CapAmb:\t0000000000000000
"""


def resolve(cgroup_id: int) -> Workload:
    path = "/machine.slice/libpod-" + PODMAN_ID + ".scope/container"
    return classify(path if cgroup_id == PODMAN_CG else "/", cgroup_id)


def refusals(rows: list[tuple[int, int, int, bytes]]) -> Batch:
    """Refusal records as the kernel writes them (struct cw_event; cap -1, flags
    outcome|refusal): (ts, pid, ret, comm), in the podman container's cgroup."""
    b = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, (ts, pid, ret, comm) in enumerate(rows):
        b[i] = (ts, PODMAN_CG, pid, pid, 0, -1, CLOCK_SETTIME, ret, REFUSED, 0, comm)
    return b


@pytest.fixture
def proc(tmp_path: Path) -> str:
    """pid 101 with a seccomp filter, pid 102 without one (both `date`)."""
    for pid, seccomp, filters in ((101, 2, 1), (102, 0, 0)):
        d = tmp_path / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "status").write_text(STATUS.format(seccomp=seccomp, filters=filters))
    return str(tmp_path / "proc")


class Sink:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def write(self, check: Check) -> None:
        self.checks.append(check)

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def traced(batch: Batch, proc_root: str, *sinks: object, reader: bool = True) -> list[Check]:
    """trace's pipeline with --outcome and one target (the reader), fed ``batch``."""
    out = Sink()
    p = trace_pipeline(
        resolve,
        [out, *sinks],  # type: ignore[list-item]
        policy=Policy.load(None),
        outcome=True,
        refusal_facts=(
            refusal_evidence(resolve, lambda tid, nr: None, proc_root=proc_root) if reader else None
        ),
    )
    p.on_batch("denials", batch)
    p.close()
    return out.checks


DATE = refusals([(1_000, 101, -errno.EPERM, b"date")])


class TestRefusalRecords:
    def test_a_seccomp_refusal_is_a_check_with_its_verdict_and_fix(self, proc: str) -> None:
        """date's clock_settime refused with EPERM, no capability checked, the process has a
        filter: one record, verdict seccomp, the podman fix; a cause with its outcome."""
        [c] = traced(DATE, proc)
        assert ("refused", "", "clock_settime", "EPERM", "cause", "date", PODMAN_ID) == (
            c.verdict,
            c.capability,
            c.syscall,
            c.outcome,
            c.role,
            c.comm,
            c.container_id,
        )
        assert c.refusal is not None
        assert ("seccomp", "podman") == (c.refusal.verdict, c.refusal.kind)
        assert {"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."} == (
            c.refusal.fixes[0]
        )
        assert c.refusal is c.finding()

    def test_without_one_target_there_is_no_reader_and_no_record(self, proc: str) -> None:
        """No reader (trace of everything): the pipeline makes no record of a refusal."""
        assert [] == traced(DATE, proc, reader=False)

    def test_a_runtime_setting_a_container_up_is_not_shown(self, proc: str) -> None:
        """conmon's tolerated refusals are no finding (as in explain)."""
        assert [] == traced(refusals([(1_000, 101, -errno.EPERM, b"conmon")]), proc)

    def test_to_dict_and_back(self, proc: str) -> None:
        """A refusal record turns back into the same check, verdict and fix included."""
        [c] = traced(DATE, proc)
        rec = c.to_dict(with_caps=True)
        assert "seccomp" == rec["refusal"]["verdict"]
        again = Check.from_dict(json.loads(json.dumps(rec)))
        assert abs(c.time - again.time) < 1e-6  # the record keeps microseconds
        assert replace(c, time=again.time) == again
        assert rec == again.to_dict(with_caps=True)
        assert c.refusal is not None
        assert again.refusal is not None
        assert c.refusal.render() == again.refusal.render()

    def test_a_malformed_refusal_is_not_a_record(self, proc: str) -> None:
        [c] = traced(DATE, proc)
        for bad in ("seccomp", {"summary": "no verdict"}, {"verdict": "x", "fixes": ["y"]}):
            with pytest.raises(ValueError, match="not a capwatch record"):
                Check.from_dict({**c.to_dict(), "refusal": bad})


class TestStateFile:
    def test_one_record_per_verdict_and_explain_last_says_the_same(
        self, proc: str, tmp_path: Path
    ) -> None:
        """Two seccomp refusals of date are one record (x2); the same comm and syscall
        refused without a filter (pid 102) is another verdict, so another record.
        explain --last gives back each refusal in the words trace showed."""
        path = str(tmp_path / "state" / "recent.json")
        batch = refusals(
            [
                (1_000, 101, -errno.EPERM, b"date"),
                (2_000, 101, -errno.EPERM, b"date"),
                (3_000, 102, -errno.EPERM, b"date"),
            ]
        )
        checks = traced(batch, proc, RecentDenials(path))
        assert ["seccomp", "seccomp", "unexplained"] == [
            c.refusal.verdict for c in checks if c.refusal is not None
        ]
        with open(path) as f:
            assert 2 == len(json.load(f))
        found = read_recent(path, 10)
        assert all(isinstance(r, Refusal) for r in found)
        by_verdict = {r.verdict: r for r in found if isinstance(r, Refusal)}
        assert (2, 1) == (by_verdict["seccomp"].count, by_verdict["unexplained"].count)
        live = checks[0].refusal
        assert live is not None
        live.count = 2
        assert live.render() == by_verdict["seccomp"].render()
        assert live.to_dict() == by_verdict["seccomp"].to_dict()

    def test_capability_findings_come_first_then_refusals(self, proc: str, tmp_path: Path) -> None:
        """A state file with a capability denial and a refusal: explain --last shows both."""
        path = str(tmp_path / "recent.json")
        store = RecentDenials(path)
        store.write(a_denial(ret=-errno.EPERM))
        [c] = traced(DATE, proc)
        store.write(c)
        store.close()
        found = read_recent(path, 10)
        assert [("CAP_SYS_TIME", "capability"), ("", "seccomp")] == [
            (f.capability, f.verdict) for f in found
        ]


class TestRendering:
    def test_json_carries_explains_verdict_for_a_capability_cause(self) -> None:
        """With verdicts (one target), a capability denial that failed its syscall carries
        explain's verdict and fix; without, the record is as before."""
        check = a_denial(ret=-errno.EPERM)
        lines = []
        for verdicts in (True, False):
            out = io.StringIO()
            JsonWriter(out, verdicts=verdicts).write(check)
            lines.append(json.loads(out.getvalue()))
        with_v, without = lines
        assert "refusal" not in without
        assert "capability" == with_v["refusal"]["verdict"]
        assert with_v["refusal"]["fixes"]
        assert with_v["refusal"]["summary"]
        assert {k: v for k, v in with_v.items() if k != "refusal"} == without

    def test_a_probe_carries_no_verdict(self) -> None:
        """A denial whose syscall failed otherwise (ENODEV) refused nothing."""
        out = io.StringIO()
        JsonWriter(out, verdicts=True).write(a_denial(ret=-errno.ENODEV))
        assert "refusal" not in json.loads(out.getvalue())

    def test_table_row_then_verdict_evidence_and_fix(self, proc: str) -> None:
        """The table shows a refusal's row (no capability, "refused"), then its verdict,
        evidence and fix, every line within 100 columns."""
        [c] = traced(DATE, proc)
        out = io.StringIO()
        TableWriter(out, verdicts=True).write(c)
        header, row, *rest = out.getvalue().splitlines()
        assert row.split()[3:7] == [PODMAN_ID[:12], "-", "refused", "clock_settime"]
        assert rest[0].startswith("  seccomp: A seccomp filter refused clock_settime")
        assert "  fix: podman: podman run --cap-add=SYS_TIME ..." in rest
        assert all(len(line) <= 100 for line in [header, row, *rest])
