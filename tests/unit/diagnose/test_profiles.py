"""capwatch.diagnose.profiles: needed vs probe, what a spec holds, owners, the merged report."""

from __future__ import annotations

import json

import pytest
import yaml

from capwatch.decode.caps import cap_name, parse_cap
from capwatch.diagnose.profiles import (
    RUNTIME_DEFAULT_CAPS,
    HeldSample,
    ProfileBook,
    ProfileKey,
    ProfileSample,
    held_capabilities,
    owner_of,
    report,
    use_of,
)


def names(caps: frozenset[int]) -> set[str]:
    return {cap_name(c) for c in caps}


class TestUse:
    @pytest.mark.parametrize(
        ("kw", "use"),
        [
            ({"denied": False, "comm": "nginx", "audit": None, "rule": None, "role": None}, "needed"),
            ({"denied": False, "comm": "nginx", "audit": True, "rule": None, "role": None}, "needed"),
            # CAP_OPT_NOAUDIT: the kernel asks without meaning it (vm_enough_memory)
            ({"denied": False, "comm": "nginx", "audit": False, "rule": None, "role": None}, None),
            # a policy rule names a known probe
            ({"denied": False, "comm": "nginx", "audit": None, "rule": "vm-enough-memory-probe", "role": None}, None),
            # the runtime setting the container up is not the workload
            ({"denied": False, "comm": "runc:[2:INIT]", "audit": None, "rule": None, "role": None}, None),
            ({"denied": False, "comm": "conmon", "audit": None, "rule": None, "role": None}, None),
            ({"denied": True, "comm": "date", "audit": None, "rule": None, "role": "cause"}, "denied"),
            ({"denied": True, "comm": "date", "audit": None, "rule": None, "role": None}, "denied"),
            ({"denied": True, "comm": "ifconfig", "audit": None, "rule": None, "role": "probe"}, None),
            ({"denied": True, "comm": "x", "audit": None, "rule": "outcome:ENODEV", "role": "probe"}, None),
        ],
    )  # fmt: skip
    def test_what_counts_as_needed(self, kw: dict[str, object], use: str | None) -> None:
        """Allowed checks are needs unless a probe or the runtime's; denials unless probes."""
        assert use == use_of(**kw)  # type: ignore[arg-type]


class TestHeld:
    def test_runtime_default(self) -> None:
        """No securityContext: the runtime's default set, named as the source."""
        caps, source = held_capabilities(None, "containerd")
        assert (RUNTIME_DEFAULT_CAPS["containerd"], "the containerd default set") == (caps, source)
        assert "CAP_NET_RAW" in names(caps)
        assert "CAP_NET_RAW" not in names(held_capabilities(None, "crio")[0])

    def test_drop_all_add_one(self) -> None:
        caps, source = held_capabilities(
            {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}, "containerd"
        )
        assert ({"CAP_NET_BIND_SERVICE"}, "drop: [ALL] plus NET_BIND_SERVICE") == (
            names(caps),
            source,
        )

    def test_add_and_drop_on_the_default(self) -> None:
        caps, _ = held_capabilities(
            {"capabilities": {"drop": ["NET_RAW", "MKNOD"], "add": ["SYS_ADMIN", "CAP_SYS_TIME"]}},
            "containerd",
        )
        assert {"CAP_SYS_ADMIN", "CAP_SYS_TIME"} <= names(caps)
        assert not {"CAP_NET_RAW", "CAP_MKNOD"} & names(caps)

    def test_privileged_holds_everything(self) -> None:
        caps, source = held_capabilities(
            {"privileged": True, "capabilities": {"drop": ["ALL"]}}, "crio"
        )
        assert (41, "privileged: true") == (len(caps), source)

    def test_unknown_runtime_is_said(self) -> None:
        _, source = held_capabilities({}, "")
        assert "assumed" in source

    def test_garbage_in_the_spec_is_ignored(self) -> None:
        caps, _ = held_capabilities(
            {"capabilities": {"add": ["NOT_A_CAP", 7], "drop": "x"}}, "crio"
        )
        assert RUNTIME_DEFAULT_CAPS["crio"] == caps


class TestOwner:
    RS = ({"kind": "ReplicaSet", "name": "web-7f9c", "controller": True},)

    def test_replicaset_leads_to_its_deployment(self) -> None:
        def lookup(kind: str, ns: str, name: str) -> list[dict[str, object]]:
            assert ("ReplicaSet", "shop", "web-7f9c") == (kind, ns, name)
            return [{"kind": "Deployment", "name": "web", "controller": True}]

        assert ("Deployment", "web") == owner_of("shop", "web-7f9c-a1", self.RS, lookup)

    def test_job_leads_to_its_cronjob(self) -> None:
        refs = [{"kind": "Job", "name": "nightly-2891", "controller": True}]
        got = owner_of(
            "ops",
            "p",
            refs,
            lambda *a: [{"kind": "CronJob", "name": "nightly", "controller": True}],
        )
        assert ("CronJob", "nightly") == got

    def test_unknown_parent_stays_the_replicaset(self) -> None:
        """A failed look-up (no RBAC, API down) names the ReplicaSet, not a guess."""
        assert ("ReplicaSet", "web-7f9c") == owner_of("shop", "p", self.RS, lambda *a: None)
        assert ("ReplicaSet", "web-7f9c") == owner_of("shop", "p", self.RS, None)

    def test_statefulset_and_bare_pod(self) -> None:
        refs = [{"kind": "StatefulSet", "name": "db", "controller": True}]
        assert ("StatefulSet", "db") == owner_of("shop", "db-0", refs, None)
        assert ("Pod", "debug") == owner_of("shop", "debug", [], None)


class TestBook:
    def test_bounded_and_counts_what_it_drops(self) -> None:
        book = ProfileBook(limit=2)
        for i in range(5):
            book.add(
                ProfileKey("ns", "", "", "c", f"p{i}", "CAP_CHOWN", "chown", "needed"), float(i)
            )
        book.add(ProfileKey("ns", "", "", "c", "p0", "CAP_CHOWN", "chown", "needed"), 9.0)
        assert (2, 3) == (len(book.seen), book.overflow)
        first, last, n = book.seen[
            ProfileKey("ns", "", "", "c", "p0", "CAP_CHOWN", "chown", "needed")
        ]
        assert (0.0, 9.0, 2) == (first, last, n)


def sample(
    pod: str, node: str, cap: str, syscall: str, use: str = "needed", t: float = 1e9
) -> ProfileSample:
    return ProfileSample("shop", "Deployment", "web", "app", pod, node, cap, syscall, use, t)


class TestReport:
    SAMPLES = (
        sample("web-1", "node-a", "CAP_NET_BIND_SERVICE", "bind"),
        sample("web-2", "node-b", "CAP_NET_BIND_SERVICE", "bind", t=1e9 + 60),
        sample("web-1", "node-a", "CAP_CHOWN", "fchownat"),
        sample("web-2", "node-b", "CAP_CHOWN", "chown"),
    )
    HELD = tuple(
        HeldSample(
            "shop", "Deployment", "web", "app", pod, "node-a", cap, "the containerd default set"
        )
        for pod in ("web-1", "web-2")
        for cap in ("CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_MKNOD")
    )

    def test_merged_over_replicas_and_nodes(self) -> None:
        """The least set with its evidence merged; what is held and never used."""
        checks = {
            ("shop", "web-1", "app", "CAP_CHOWN"): 3,
            ("shop", "web-2", "app", "CAP_CHOWN"): 4,
        }
        [r] = report(self.SAMPLES, self.HELD, checks)
        assert ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"] == r.least
        bind = r.needed["CAP_NET_BIND_SERVICE"]
        assert (["bind"], 2, 2, "2001-09-09T01:47:40Z") == (
            bind["syscalls"], bind["replicas"], bind["nodes"], bind["last_seen"]
        )  # fmt: skip
        assert (["chown", "fchownat"], 7) == (
            r.needed["CAP_CHOWN"]["syscalls"],
            r.needed["CAP_CHOWN"]["checks"],
        )
        assert ["CAP_MKNOD", "CAP_NET_RAW"] == r.unused
        assert [] == r.missing

    def test_patches_say_the_same_thing(self) -> None:
        """The kustomize patch (YAML) and the kubectl patch (JSON) carry one change:
        drop ALL, add exactly the least set, on the right container."""
        [r] = report(self.SAMPLES)
        want = {"drop": ["ALL"], "add": ["CHOWN", "NET_BIND_SERVICE"]}
        y = yaml.safe_load(r.kustomize_patch())
        assert ("apps/v1", "Deployment", {"name": "web", "namespace": "shop"}) == (
            y["apiVersion"], y["kind"], y["metadata"]
        )  # fmt: skip
        [c] = y["spec"]["template"]["spec"]["containers"]
        assert ("app", want) == (c["name"], c["securityContext"]["capabilities"])
        body = json.loads(r.kubectl_patch().split(" -p ", 1)[1].strip("'"))
        assert (
            want
            == body["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
        )
        assert r.kubectl_patch().startswith("kubectl -n shop patch deployment web --type strategic")

    def test_cronjob_patch_path(self) -> None:
        s = ProfileSample(
            "ops", "CronJob", "nightly", "job", "p", "n", "CAP_CHOWN", "chown", "needed", 1.0
        )
        [r] = report([s])
        y = yaml.safe_load(r.kustomize_patch())
        assert "batch/v1" == y["apiVersion"]
        assert (
            "job" == y["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["name"]
        )

    def test_restricted_fit_and_dangerous(self) -> None:
        """Only NET_BIND_SERVICE fits PSS restricted; SYS_ADMIN is flagged."""
        [bind_only] = report([sample("p", "n", "CAP_NET_BIND_SERVICE", "bind")])
        assert (True, []) == (bind_only.fits_restricted, bind_only.dangerous)
        [admin] = report([sample("p", "n", "CAP_SYS_ADMIN", "mount", use="denied")])
        assert (False, ["CAP_SYS_ADMIN"], ["CAP_SYS_ADMIN"]) == (
            admin.fits_restricted, admin.dangerous, admin.missing
        )  # fmt: skip
        assert "denied now: add it" in admin.render()

    def test_holds_but_never_used(self) -> None:
        held = [
            HeldSample(
                "shop", "Deployment", "admin", "app", "a-1", "node-a", "CAP_SYS_ADMIN", "add"
            )
        ]
        [r] = report([], held)
        assert ([], ["CAP_SYS_ADMIN"]) == (r.least, r.unused)
        assert "used no capability" in r.render()

    def test_every_capability_name_round_trips_in_patches(self) -> None:
        """Whatever the least set, the patch names capabilities the way Kubernetes spells them."""
        for n in range(41):
            [r] = report([sample("p", "n", cap_name(n), "x")])
            add = yaml.safe_load(r.kustomize_patch())["spec"]["template"]["spec"]["containers"][0][
                "securityContext"
            ]["capabilities"]["add"]
            assert [cap_name(n).removeprefix("CAP_")] == add
            assert n == parse_cap(add[0])


def test_spec_strings_that_are_not_capabilities_never_reach_the_source() -> None:
    """A tenant writes the pod spec: an escape sequence or a huge list in
    capabilities.add is counted, not copied into the held series' label."""
    hostile = ["\x1b]52;c;aGk=\x07", "X" * 10_000, "NET_ADMIN"]
    caps, source = held_capabilities({"capabilities": {"add": hostile}}, "containerd")
    assert "CAP_NET_ADMIN" in names(caps)
    assert (
        "the containerd default set plus NET_ADMIN (2 names that are not capabilities ignored)"
        == source
    )
