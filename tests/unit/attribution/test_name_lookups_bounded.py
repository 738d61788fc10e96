"""Container-name look-ups are bounded and rate-limited, and asked only for
cgroups in the places runtimes put them (issue 12, finding 6)."""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import pytest

from capwatch.attribution.containers import Attributor, ContainerNames
from capwatch.ratelimit import TokenBucket

REAL = "0123456789abcdef" * 4


class FrozenClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def settle(names: ContainerNames, fetched: int) -> None:
    """Wait until the look-up thread has done ``fetched`` look-ups (or 5 s)."""
    deadline = time.monotonic() + 5
    while names.fetched < fetched and time.monotonic() < deadline:
        time.sleep(0.01)


class TestTokenBucket:
    def test_burst_then_rate(self) -> None:
        """burst tokens at once, then one per 1/rate seconds of the clock."""
        clock = FrozenClock()
        b = TokenBucket(2.0, 3, clock=clock)
        assert [True, True, True, False] == [b.try_take() for _ in range(4)]
        assert 0.5 == b.wait_time()
        clock.now += 0.5
        assert [True, False] == [b.try_take(), b.try_take()]
        clock.now += 100  # never more than the burst
        assert 3 == sum(b.try_take() for _ in range(10))

    def test_take_gives_up_when_stopped(self) -> None:
        """take() with no token and a stop event set returns False at once."""
        b = TokenBucket(0.0, 1, clock=FrozenClock())
        assert b.try_take()
        stop = threading.Event()
        stop.set()
        assert not b.take(stop)

    def test_bad_parameters(self) -> None:
        with pytest.raises(ValueError, match="rate must be"):
            TokenBucket(1.0, 0)


class TestBoundedLookups:
    def test_flood_of_ids_is_bounded_and_counted(self, tmp_path: Path) -> None:
        """1,000 unknown ids, a bucket of 3 that never refills, 10 pending at most:
        3 look-ups are done, at most 10 + 1 ids wait, every other id is counted
        as dropped."""
        names = ContainerNames(
            storage_root=str(tmp_path),
            docker_root=str(tmp_path),
            inspect=False,
            max_pending=10,
            bucket=TokenBucket(1.0, 3, clock=FrozenClock()),
        )
        try:
            for _ in range(1000):
                assert names.lookup("podman", secrets.token_hex(32)) is None
            settle(names, 3)
            assert 3 == names.fetched
            assert names.requested <= 10 + 1 + 3
            assert 1000 == names.requested + names.dropped
        finally:
            names.close()

    def test_a_dropped_id_is_asked_again_later(self, tmp_path: Path) -> None:
        """An id dropped while the queue was full is queued on a later miss."""
        names = ContainerNames(
            storage_root=str(tmp_path),
            inspect=False,
            max_pending=1,
            bucket=TokenBucket(0.0, 1, clock=FrozenClock()),
        )
        try:
            names.lookup("podman", "a" * 64)
            settle(names, 1)  # the one token is spent; the thread now waits for another
            names.lookup("podman", "b" * 64)  # waits in the queue
            names.lookup("podman", "c" * 64)  # dropped
            assert (2, 1) == (names.requested, names.dropped)
        finally:
            names.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_no_lookup_for_a_users_cgroup(tmp_path: Path) -> None:
    """A libpod-<id> cgroup under a directory a user owns costs no look-up; a
    container where podman puts it costs one."""
    (tmp_path / "libpod_parent" / "mine").mkdir(parents=True)
    os.chown(tmp_path / "libpod_parent" / "mine", 4242, 4242)
    spoof = tmp_path / "libpod_parent" / "mine" / f"libpod-{REAL}"
    spoof.mkdir()
    real = tmp_path / "libpod_parent" / f"libpod-{'f' * 64}"
    real.mkdir()
    names = ContainerNames(storage_root=str(tmp_path / "store"), inspect=False)
    a = Attributor(cgroup_root=str(tmp_path), container_names=names, background=False, names=False)
    try:
        a.resolve(spoof.stat().st_ino)
        assert 0 == names.requested
        a.resolve(real.stat().st_ino)
        assert 1 == names.requested
    finally:
        a.close()
        names.close()
