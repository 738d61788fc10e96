"""capwatch.record: a recording written from ring batches replays through the
same pipeline into the same records; cut, corrupt and rotated files."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from capwatch.attribution.containers import Workload, classify
from capwatch.commands.trace import trace_pipeline
from capwatch.decode.events import EVENT_DTYPE, F_DENIED, F_OUTCOME, Batch
from capwatch.diagnose.policy import Policy
from capwatch.errors import RecordingError
from capwatch.pipeline import Check, Clock, status_of
from capwatch.record.format import FrameReader
from capwatch.record.replay import Recording
from capwatch.record.writer import Recorder, rotated_names
from tests.helpers import FIXTURES, run_capwatch

PODMAN_ID = "4f" * 32
PATHS = {
    7: "/machine.slice/libpod-" + PODMAN_ID + ".scope/container",
    9: "/system.slice/ntp.service",
    1: "/",
}
CLOCK_SETTIME, IOCTL, SETUID = 227, 16, 105
PROC = str(FIXTURES / "proc")
HOST = {
    "format": 1,
    "capwatch": "test",
    "kernel": "6.18.0",
    "attach": "raw_tracepoint",
    "hostname": "node-a",
    "clock_offset_ns": 1_700_000_000 * 10**9,
    "config": {"emit_all": True, "outcome": True},
}


class Names:
    """Attribution as the live Attributor behaves: the podman container's name
    is learnt a moment after its first event (``learn``)."""

    def __init__(self) -> None:
        self.named = False

    def __call__(self, cgroup_id: int) -> Workload:
        w = classify(PATHS.get(cgroup_id, "/"), cgroup_id)
        if cgroup_id == 7 and self.named:
            w = dataclasses.replace(w, name="web")
        return w


def batch(rows: list[tuple[int, int, int, int, int, int, int, bytes]]) -> Batch:
    """(ts, cgroup, pid, cap, syscall, ret, flags, comm), as the kernel writes them."""
    b = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, (ts, cg, pid, cap, nr, ret, flags, comm) in enumerate(rows):
        b[i] = (ts, cg, pid, pid, 0, cap, nr, ret, flags, 0, comm)
    return b


#: Drains as a live session saw them: date denied in the podman container
#: (pid 1234 has a status in the fixture /proc), its EPERM; ifconfig's probe;
#: allowed setuid checks on the checks ring.
DRAINS: list[list[tuple[str, Batch]]] = [
    [
        (
            "denials",
            batch(
                [
                    (1_000, 7, 1234, 25, CLOCK_SETTIME, 0, F_DENIED, b"date"),
                    (1_100, 7, 1234, 0, CLOCK_SETTIME, -errno.EPERM, F_OUTCOME, b"date"),
                ]
            ),
        ),
        ("checks", batch([(1_200 + i, 1, 404, 7, SETUID, 0, 0, b"su") for i in range(5)])),
    ],
    [
        (
            "denials",
            batch(
                [
                    (2_000, 9, 202, 12, IOCTL, 0, F_DENIED, b"ifconfig"),
                    (2_100, 9, 202, 0, IOCTL, -errno.ENODEV, F_OUTCOME, b"ifconfig"),
                ]
            ),
        )
    ],
]


def record(path: Path, drains: list[list[tuple[str, Batch]]], **kw: object) -> Names:
    names = Names()
    r = Recorder(
        str(path),
        HOST,
        names,
        status_of(PROC),
        counts=lambda: {(7, 25, True): 1, (1, 7, False): 5},
        stats=lambda: {"lost_checks": 0, "suppressed": 0},
        **kw,  # type: ignore[arg-type]
    )
    for i, drain in enumerate(drains):
        for ring, b in drain:
            r.on_batch(ring, b)
        r.tick()
        if i == 0:
            names.named = True  # the name source answered after the first drain
    r.close()
    return names


def live(drains: list[list[tuple[str, Batch]]], names: Callable[[int], Workload]) -> list[Check]:
    """The same drains straight through trace's pipeline, as `trace` did live."""
    out = Sink()
    clock = Clock()
    clock.offset_ns = int(HOST["clock_offset_ns"])  # type: ignore[call-overload]
    p = trace_pipeline(
        names, [out], policy=Policy.load(None), outcome=True, proc_root=PROC, clock=clock
    )
    for drain in drains:
        for ring, b in drain:
            p.on_batch(ring, b)
        p.tick()
    p.close()
    return out.checks


class Sink:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def write(self, check: Check) -> None:
        self.checks.append(check)

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def replay(*paths: Path) -> tuple[list[Check], Recording]:
    rec = Recording([str(p) for p in paths])
    out = Sink()
    p = trace_pipeline(
        rec.resolve,
        [out],
        policy=Policy.load(None),
        outcome=True,
        snapshot=rec.snapshot,
        clock=rec.clock,
        monotonic_ns=rec.now_ns,
    )
    rec.feed(p)
    return out.checks, rec


class TestReplayIsLive:
    def test_replay_makes_the_records_live_made(self, tmp_path: Path) -> None:
        """Recorded drains replayed through trace's pipeline give the records the
        live pipeline gave: same times, identities, outcomes, classes, sets."""
        f = tmp_path / "a.cwrec"
        record(f, DRAINS)
        names = Names()
        names.named = True  # live held the container's event until its name came
        expected = [c.to_dict(with_caps=True) for c in live(DRAINS, names)]
        got, rec = replay(f)
        assert expected == [c.to_dict(with_caps=True) for c in got]
        assert rec.cut is None
        assert 9 == rec.events

    def test_attribution_and_sets_come_from_the_recording(self, tmp_path: Path) -> None:
        """The replaying host knows neither the container nor pid 1234: the
        recorded name and the sets read at the denial are used."""
        f = tmp_path / "a.cwrec"
        record(f, DRAINS)
        got, _ = replay(f)
        date = next(c for c in got if c.comm == "date")
        assert ("web", "podman", "cause") == (date.container, date.runtime, date.role)
        assert date.status is not None
        assert 1234 == date.status.pid

    def test_counts_stats_and_host_facts_are_kept(self, tmp_path: Path) -> None:
        f = tmp_path / "a.cwrec"
        record(f, DRAINS)
        _, rec = replay(f)
        assert {(7, 25, True): 1, (1, 7, False): 5} == rec.counts
        assert ("node-a", "6.18.0", True) == (
            rec.host["hostname"],
            rec.host["kernel"],
            rec.config["outcome"],
        )


def many_drains(n: int) -> list[list[tuple[str, Batch]]]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        rows = [
            (
                10_000 * i + j,
                1,
                int(rng.integers(1, 1 << 22)),
                int(rng.integers(0, 41)),
                105,
                0,
                0,
                b"su",
            )
            for j in range(20)
        ]
        out.append([("checks", batch(rows))])
    return out


class TestCutAndCorrupt:
    def test_a_cut_at_every_offset_of_the_last_4k_replays_the_whole_frames(
        self, tmp_path: Path
    ) -> None:
        """Cut anywhere: every frame that ended before the cut is replayed, and
        the cut is reported unless it fell on a frame boundary."""
        f = tmp_path / "a.cwrec"
        record(f, many_drains(60))
        data = f.read_bytes()
        assert len(data) > 8192
        with open(f, "rb") as fh:
            frames = list(FrameReader(fh, str(f)))
        ends = [fr.offset for fr in frames[1:]] + [len(data)]
        events_by_end = []
        seen = 0
        for fr, end in zip(frames, ends, strict=True):
            seen += _events_in(fr.body) if fr.kind == 2 else 0
            events_by_end.append((end, seen))
        cut = tmp_path / "cut.cwrec"
        for size in range(len(data) - 4096, len(data) + 1):
            cut.write_bytes(data[:size])
            rec = Recording([str(cut)])
            for _ in rec.drains():
                pass
            whole = max(n for end, n in [(0, 0), *events_by_end] if end <= size)
            assert whole == rec.events, size
            on_boundary = size in {end for end, _ in events_by_end}
            assert (rec.cut is None) == on_boundary, size
            if rec.cut is not None:
                assert (
                    f"the last {size - max(e for e, _ in events_by_end if e <= size)} bytes"
                    in rec.cut
                )

    def test_a_cut_file_replays_then_says_so_in_one_line(self, tmp_path: Path) -> None:
        f = tmp_path / "a.cwrec"
        record(f, DRAINS)
        f.write_bytes(f.read_bytes()[:-7])
        r = run_capwatch("trace", "--from", str(f), "--json")
        assert 1 == r.returncode
        assert "recording cut short: the last" in r.stderr.splitlines()[-1]
        assert "Traceback" not in r.stderr
        assert r.stdout.count("\n") >= 1, "the whole frames before the cut were replayed"

    @pytest.mark.parametrize(
        ("damage", "message"),
        [
            (lambda d: b"GARBAGE!" + d[8:], "not a capwatch recording (bad magic)"),
            (lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:], "corrupt frame"),
            (lambda d: d[:6] + struct.pack("<H", 99) + d[8:], "recording format 99"),
            (lambda d: d[:3], "no host frame"),
            (lambda d: b"", "not a capwatch recording (too short)"),
        ],
    )
    def test_a_malformed_file_is_one_line_and_non_zero(
        self, tmp_path: Path, damage: Callable[[bytes], bytes], message: str
    ) -> None:
        f = tmp_path / "a.cwrec"
        record(f, DRAINS)
        f.write_bytes(damage(f.read_bytes()))
        for cmd in ("trace", "explain", "advise"):
            r = run_capwatch(cmd, "--from", str(f))
            assert 1 == r.returncode, (cmd, r.stderr)
            assert 1 == len(r.stderr.strip().splitlines()), (cmd, r.stderr)
            assert message in r.stderr, (cmd, r.stderr)
        with pytest.raises(RecordingError):
            _, _rec = replay(f)

    def test_a_missing_file_is_one_line(self, tmp_path: Path) -> None:
        r = run_capwatch("explain", "--from", str(tmp_path / "nope"))
        assert (1, f"capwatch: {tmp_path / 'nope'}: no such recording\n") == (
            r.returncode,
            r.stderr,
        )


class TestRotation:
    def test_rotated_files_each_replay_alone_and_together_in_full(self, tmp_path: Path) -> None:
        """Past --max-size a new file starts (FILE.1 the one before); each file
        restates the host, workloads and sets, so each replays on its own."""
        f = tmp_path / "r.cwrec"
        drains = DRAINS + many_drains(40)
        record(f, drains, max_size=4096, keep=100)
        files = rotated_names(str(f), 100)
        assert len(files) >= 3
        total = sum(len(b) for d in drains for _, b in d)
        _, rec = replay(*map(Path, files))
        assert total == rec.events
        for name in files:
            _, one = replay(Path(name))
            assert one.cut is None
            assert one.host["hostname"] == "node-a"
        _, newest = replay(Path(files[-1]))
        assert "web" == newest.resolve(7).name, "the newest file restates the container's name"
        assert newest.sets_of(1234) is not None, "and the sets read before it began"

    def test_keep_bounds_the_files(self, tmp_path: Path) -> None:
        f = tmp_path / "r.cwrec"
        record(f, many_drains(80), max_size=4096, keep=2)
        assert [f"{f}.2", f"{f}.1", str(f)] == rotated_names(str(f), 10)
        assert not os.path.exists(f"{f}.3")


def _events_in(body: bytes) -> int:
    from capwatch.record.format import Drain

    return sum(len(b) for _, b in Drain.decode(body).batches)


class TestWriteErrors:
    def test_a_full_disk_is_one_error_not_a_traceback(self, tmp_path: Path) -> None:
        """/dev/full refuses every write: the recorder says so in one line."""
        with pytest.raises(RecordingError, match=r"cannot write /dev/full: No space left"):
            record(Path("/dev/full"), DRAINS)

    def test_record_to_a_missing_directory_is_one_line(self, tmp_path: Path) -> None:
        """The CLI refuses before attaching when it cannot write the file."""
        r = run_capwatch("record", "-o", str(tmp_path / "no" / "such" / "f"), "--duration", "1")
        assert 0 != r.returncode
        assert 1 == len(r.stderr.strip().splitlines()), r.stderr
        assert "Traceback" not in r.stderr


class TestTopFromARecording:
    def test_top_once_shows_the_recorded_counts(self, tmp_path: Path) -> None:
        """top --once --from: the rows are the recorded count map's, named by the
        recorded identities (the container's name, learnt while recording)."""
        f = tmp_path / "a.cwrec"
        record(f, DRAINS)
        r = run_capwatch("top", "--once", "--from", str(f))
        assert 0 == r.returncode, r.stderr
        table = [ln.split() for ln in r.stdout.splitlines()[3:]]
        assert [["web", "CAP_SYS_TIME", "denied"], ["host", "CAP_SETUID", "allowed"]] == [
            row[:3] for row in table
        ]
        assert ["1", "5"] == [row[4] for row in table]
        assert "clock_settime" == table[0][5]


def test_a_cgroup_only_the_count_map_saw_is_named_in_the_recording(tmp_path: Path) -> None:
    """Allowed checks without --all reach only the count map: their cgroups are
    recorded too, so that top --from names the rows as live top did."""
    f = tmp_path / "c.cwrec"
    r = Recorder(str(f), HOST, Names(), status_of(PROC), counts=lambda: {(9, SETUID, False): 12})
    r.tick()
    r.close()
    _, rec = replay(f)
    assert ({(9, SETUID, False): 12}, "ntp.service") == (rec.counts, rec.resolve(9).label)
