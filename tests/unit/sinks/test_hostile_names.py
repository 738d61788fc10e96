"""Names an attacker chooses (comm, cgroup directory, container name) at every sink:
valid UTF-8, no control character, the odd bytes visible as escapes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from capwatch.attribution.containers import Workload, classify
from capwatch.decode.events import EVENT_STRUCT, F_DENIED, decode_record
from capwatch.diagnose.explain import DenialFacts, explain
from capwatch.diagnose.outcome import Joined
from capwatch.pipeline import Check, Pipeline
from capwatch.sinks.denylog import DenialLog
from capwatch.sinks.exporter import CapwatchCollector, ExporterState
from capwatch.sinks.render import JsonWriter, TableWriter
from capwatch.text import visible_all
from tests.helpers import REPO

CID = "340583a2a7181ca3900b47c12ac598e49d84f0a748abd3279b7ca3228a636bc1"

#: Raw names as the kernel or a runtime hands them over.
HOSTILE = {
    "osc52": b"\x1b]52;c;aGk=\x07",
    "conceal": b"\x1b[8mhidden",
    "byte": b"ev\xffil",
    "newline": b"a\nfake line\r",
}
#: One real syscall per hostile name, to tell the log's records apart.
SYSCALLS = (227, 164, 16, 9)
SYSCALL_NAMES = ("clock_settime", "settimeofday", "ioctl", "mmap")
SHOWN = {
    "osc52": "\\x1b]52;c;aGk=\\x07",
    "conceal": "\\x1b[8mhidden",
    "byte": "ev\\xffil",
    "newline": "a\\nfake line\\r",
}


def clean(text: str) -> None:
    """Valid UTF-8 and no control character except the line structure's own newline."""
    text.encode("utf-8")
    bad = [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs")]
    assert [] == bad, text


class FakeSource:
    """Counts keyed like the kernel's map: (cgroup id, cap, denied) -> count."""

    mode = "raw_tracepoint"

    def __init__(self, counts: dict[tuple[int, int, bool], int], delay: float = 0.0) -> None:
        self.counts = counts
        self.delay = delay

    def read_counts(self) -> dict[tuple[int, int, bool], int]:
        time.sleep(self.delay)
        return dict(self.counts)

    def read_stats(self) -> dict[str, int]:
        return {}

    def delete_counts(self, keys: list[tuple[int, int, bool]]) -> None:
        pass


def comm_of(raw: bytes) -> str:
    """A comm as the decoder makes it from a ring record."""
    rec = EVENT_STRUCT.pack(1, 7, 42, 42, 1000, 25, 227, 0, F_DENIED, 0, raw[:15])
    return decode_record(rec).comm


class TestExposition:
    @pytest.mark.parametrize("which", sorted(HOSTILE))
    def test_cgroup_and_container_names(self, which: str) -> None:
        """A cgroup directory and a container name with any bytes: the scrape works,
        is valid UTF-8, and shows the bytes as escapes (it raised UnicodeEncodeError)."""
        bad = os.fsdecode(HOSTILE[which])  # what os.scandir gives for such a directory

        def resolve(cg: int) -> Workload:
            if cg == 5:
                return classify(f"/system.slice/{bad}.scope", cg)
            return replace(classify(f"/machine.slice/libpod-{CID}.scope", cg), name=bad)

        state = ExporterState(FakeSource({(5, 25, True): 3, (6, 21, True): 2}), resolve)  # type: ignore[arg-type]
        state.count_denial(5, 25, expected=False)
        state.count_denial(6, 21, expected=False)
        text = CapwatchCollector(state).exposition().decode("utf-8")
        clean(text)
        shown = SHOWN[which].replace("\\", "\\\\")  # the exposition escapes backslashes
        checks = [ln for ln in text.splitlines() if ln.startswith("capwatch_checks_total{")]
        assert 2 == len(checks)
        assert any(f'{shown}.scope",' in ln for ln in checks)  # a unit, or the whole path
        assert any(f'container="{shown}"' in ln for ln in checks)
        denials = [ln for ln in text.splitlines() if ln.startswith("capwatch_denials_total{")]
        assert 2 == len(denials)

    def test_generate_latest_too(self) -> None:
        """The prometheus_client path (collect()) gets the same escaped labels."""
        bad = os.fsdecode(b"ev\xffil")
        state = ExporterState(
            FakeSource({(5, 25, True): 1}),  # type: ignore[arg-type]
            lambda cg: classify(f"/system.slice/{bad}.scope", cg),
        )
        reg = CollectorRegistry()
        reg.register(CapwatchCollector(state))
        assert 'container="ev\\\\xffil.scope"' in generate_latest(reg).decode("utf-8")


class TestScrapeDuration:
    def test_includes_the_kernel_read(self) -> None:
        """capwatch_scrape_duration_seconds covers read_counts (it started after it)."""
        state = ExporterState(
            FakeSource({(1, 7, False): 1}, delay=0.2),  # type: ignore[arg-type]
            lambda cg: classify("/", cg),
        )
        text = CapwatchCollector(state).exposition().decode()
        (line,) = [
            ln for ln in text.splitlines() if ln.startswith("capwatch_scrape_duration_seconds ")
        ]
        assert float(line.split()[1]) >= 0.2


class TestDenialLog:
    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_hostile_fields(self, fmt: str) -> None:
        """comm and workload names in the log: escaped, valid UTF-8, one line per record."""
        out = io.StringIO()
        log = DenialLog(out, fmt=fmt)  # type: ignore[arg-type]
        for nr, raw in zip(SYSCALLS, HOSTILE.values(), strict=True):
            log.write(
                Check(
                    time=1.7e9,
                    pid=1,
                    tid=1,
                    uid=0,
                    comm=comm_of(raw),
                    cgroup_id=1,
                    container=os.fsdecode(raw) + "-c",
                    kind="podman",
                    runtime="podman",
                    container_id="",
                    container_name="",
                    pod="",
                    namespace="",
                    cap=25,
                    denied=True,
                    syscall_nr=nr,
                )
            )
        log.close()
        text = out.getvalue()
        clean(text)
        lines = text.splitlines()
        assert 2 * len(HOSTILE) == len(lines)  # a denial and a summary each, no injected line
        if fmt == "json":
            recs = [json.loads(ln) for ln in lines if '"denial"' in ln]
            which = dict(zip(SYSCALL_NAMES, HOSTILE, strict=True))
            assert {SHOWN[which[r["syscall"]]] for r in recs} == {r["comm"] for r in recs}
            assert {SHOWN[which[r["syscall"]]] + "-c" for r in recs} == {
                r["container"] for r in recs
            }


class TestTrace:
    def _rec(self, raw: bytes) -> Check:
        rec = EVENT_STRUCT.pack(1, 7, 42, 42, 1000, 25, 227, 0, F_DENIED, 0, raw[:15])
        ev = decode_record(rec)
        w = replace(classify(f"/machine.slice/libpod-{CID}.scope", 7), name=os.fsdecode(raw))
        return Pipeline(lambda _cg: w, []).check_of(Joined(ev, None))

    def test_table(self) -> None:
        """The terminal table carries no control sequence from a comm or a name."""
        out = io.StringIO()
        table = TableWriter(out)
        for raw in HOSTILE.values():
            table.write(self._rec(raw))
        clean(out.getvalue())
        assert 1 + len(HOSTILE) == len(out.getvalue().splitlines())

    def test_json(self) -> None:
        """JSON lines: valid UTF-8, the comm escaped."""
        out = io.StringIO()
        writer = JsonWriter(out)
        for raw in HOSTILE.values():
            writer.write(self._rec(raw))
        clean(out.getvalue())
        comms = [json.loads(ln)["comm"] for ln in out.getvalue().splitlines()]
        assert [SHOWN[k] for k in HOSTILE] == comms

    @given(st.text(max_size=20), st.binary(max_size=20))
    def test_json_fast_path_equals_escaping_every_field(self, comm: str, name: bytes) -> None:
        """The writer's shortcut (no second pass for a plain line) writes exactly what
        escaping every field would."""
        check = replace(self._rec(b"x"), comm=comm, container=os.fsdecode(name))
        out = io.StringIO()
        JsonWriter(out).write(check)
        want = json.dumps(visible_all(check.to_dict()), separators=(",", ":"))
        assert want + "\n" == out.getvalue()


class TestExplain:
    @pytest.mark.parametrize("which", sorted(HOSTILE))
    def test_render_and_dict(self, which: str) -> None:
        """explain's text and JSON show the comm and container escaped."""
        ex = explain(
            DenialFacts(
                cap=25,
                syscall="clock_settime",
                comm=comm_of(HOSTILE[which]),
                pid=1,
                kind="podman",
                container=os.fsdecode(HOSTILE[which]),
            )
        )
        text = ex.render()
        clean(text)
        assert SHOWN[which] in text.splitlines()[0]
        d = json.dumps(ex.to_dict(), ensure_ascii=False)
        clean(d)
        assert SHOWN[which] == ex.to_dict()["comm"]


class TestPs:
    def test_hostile_process_name(self, tmp_path: Path) -> None:
        """ps (table and JSON) shows a process name with ESC and a 0xff byte escaped."""
        proc = tmp_path / "proc"
        shutil.copytree(REPO / "tests/fixtures/proc", proc)
        status = proc / "77" / "status"
        body = status.read_bytes().replace(b"Name:\tcat", b"Name:\t\x1b]52;c;aGk=\x07\xff", 1)
        status.write_bytes(body)
        for extra in ([], ["--json"]):
            r = subprocess.run(
                [sys.executable, "-m", "capwatch.commands.cli", "ps", "--proc-root", str(proc), *extra],
                capture_output=True,
                cwd=REPO,
                check=False,
            )
            assert 0 == r.returncode, r.stderr
            text = r.stdout.decode("utf-8")
            clean(text)
            if extra:
                assert "\\x1b]52;c;aGk=\\x07\\xff" == json.loads(text)[0]["name"]
            else:
                assert " \\x1b]52;c;aGk=\\ " in text  # escaped, then cut to 15 columns
