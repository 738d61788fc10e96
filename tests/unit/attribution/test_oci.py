"""A container's capability sets from its own configuration (capwatch.attribution.oci)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from capwatch.attribution.oci import config_sets, parse_config, sets_status
from capwatch.decode.caps import parse_cap
from tests.helpers import FIXTURES

FIXTURE = FIXTURES / "oci" / "podman-config.json"
CID = "3674ea9edce0c0988cab5bc939ca777bbea368c9d734727b837d3331cdf4c2df"
DEFAULT_PODMAN = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
]


def mask(names: list[str]) -> int:
    out = 0
    for n in names:
        out |= 1 << parse_cap(n)
    return out


class TestParse:
    def test_podman_config(self) -> None:
        """podman's config.json: the bounding set is podman's default plus SYS_TIME."""
        sets = parse_config(json.loads(FIXTURE.read_text()), "x/config.json")
        assert sets is not None
        want = mask([*DEFAULT_PODMAN, "CAP_SYS_TIME"])
        assert (0, want, want, want, "x/config.json") == (
            sets.uid,
            sets.bounding,
            sets.permitted,
            sets.effective,
            sets.source,
        )

    def test_runc_state(self) -> None:
        """runc's state.json keeps the sets under config.capabilities, capitalised."""
        doc = {"config": {"capabilities": {"Bounding": ["CAP_KILL"], "Effective": ["CAP_KILL"]}}}
        sets = parse_config(doc, "state.json")
        assert sets is not None
        assert (1 << parse_cap("CAP_KILL"), 0) == (sets.bounding, sets.permitted)

    def test_neither(self) -> None:
        """A document without capabilities is no answer."""
        assert parse_config({"process": {}}, "x") is None
        assert parse_config([], "x") is None


class TestRead:
    def test_found_under_host_root(self, tmp_path: Path) -> None:
        """The config is found by the container's full id under a host root given as argument."""
        d = tmp_path / "var/lib/containers/storage/overlay-containers" / CID / "userdata"
        d.mkdir(parents=True)
        shutil.copy(FIXTURE, d / "config.json")
        sets = config_sets(CID, host_root=str(tmp_path))
        assert sets is not None
        assert str(d / "config.json") == sets.source
        assert config_sets(CID[:12] + "*", host_root=str(tmp_path)) is None  # never a pattern
        assert config_sets("0" * 64, host_root=str(tmp_path)) is None

    def test_status_for_the_same_and_another_user(self) -> None:
        """The configured user gets all the sets; another uid only the bounding set."""
        sets = parse_config(json.loads(FIXTURE.read_text()), "c")
        assert sets is not None
        root = sets_status(sets, 5, "date", 0)
        other = sets_status(sets, 5, "date", 1000)
        assert (sets.bounding, sets.permitted) == (root.cap_bnd, root.cap_prm)
        assert (sets.bounding, 0, 1000) == (other.cap_bnd, other.cap_prm, other.uid)
