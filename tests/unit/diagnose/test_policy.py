"""capwatch.diagnose.policy: loading, validation errors with file and line, matching."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capwatch.decode.caps import CAP_LAST_CAP, cap_name
from capwatch.diagnose.policy import Policy, PolicyError, Rule
from capwatch.errors import CapwatchError

HOST = {"container": "host", "pod": "", "namespace": ""}


def _policy(text: str) -> Policy:
    return Policy.from_text(textwrap.dedent(text), source="p.yaml")


def _error(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        _policy(text)
    return str(info.value)


def _classify(policy: Policy, **kw: object) -> str | None:
    args: dict[str, object] = {"cap": 21, "syscall": "mmap", "comm": "nginx", **HOST}
    args.update(kw)
    rule = policy.classify(**args)  # type: ignore[arg-type]
    return None if rule is None else rule.name


class TestDefaultPolicy:
    def test_loads_from_package_data(self) -> None:
        """Policy.load(None) reads the shipped default, with rules and reasons."""
        policy = Policy.load(None)
        assert (True, True) == (len(policy.rules) >= 4, all(r.why for r in policy.rules))

    @pytest.mark.parametrize(
        ("cap", "syscall", "rule"),
        [
            ("CAP_SYS_MODULE", "ioctl", "dev-load-module-probe"),
            ("CAP_SYS_ADMIN", "mmap", "vm-enough-memory-probe"),
            ("CAP_SYS_ADMIN", "brk", "vm-enough-memory-probe"),
            ("CAP_SYS_ADMIN", "clone", "vm-enough-memory-probe-clone"),
            ("CAP_SYS_ADMIN", "write", "shmem-accounting-probe"),
            ("CAP_DAC_READ_SEARCH", "openat", "dac-read-search-before-override"),
            ("CAP_SYS_PTRACE", "read", "proc-pid-ptrace-probe"),
            # Real refusals stay unexpected.
            ("CAP_SYS_ADMIN", "mount", None),
            ("CAP_SYS_ADMIN", "unshare", None),
            ("CAP_SYS_MODULE", "finit_module", None),
            ("CAP_NET_ADMIN", "ioctl", None),
            ("CAP_DAC_OVERRIDE", "openat", None),
            ("CAP_DAC_READ_SEARCH", "open_by_handle_at", None),
            ("CAP_SYS_PTRACE", "ptrace", None),
            ("CAP_SYS_TIME", "clock_settime", None),
        ],
    )
    def test_classifies_known_probes_and_leaves_real_denials(
        self, cap: str, syscall: str, rule: str | None
    ) -> None:
        """The kernel's probing checks are expected; real refusals are not."""
        policy = Policy.load(None)
        from capwatch.decode.caps import parse_cap

        assert rule == _classify(policy, cap=parse_cap(cap), syscall=syscall)


class TestMatching:
    POLICY = """\
        rules:
          - name: ntp
            why: chrony probes CAP_SYS_TIME at start
            capability: [CAP_SYS_TIME, 24]
            comm: chrony*
          - name: kube-system-anything
            why: system pods are trusted here
            namespace: kube-system
          - name: web-ptrace
            why: the web tier's health checker reads /proc
            capability: sys_ptrace
            syscall: read
            container: [web, web-*]
            pod: "shop-*"
        """

    @pytest.mark.parametrize(
        ("kw", "expected"),
        [
            ({"cap": 25, "comm": "chronyd"}, "ntp"),
            ({"cap": 24, "comm": "chrony"}, "ntp"),
            ({"cap": 25, "comm": "ntpd"}, None),
            ({"cap": 25, "comm": "Chronyd"}, None),  # globs are case-sensitive
            ({"cap": 12, "namespace": "kube-system", "pod": "x"}, "kube-system-anything"),
            ({"cap": 12, "namespace": "kube-system-2", "pod": "x"}, None),
            (
                {"cap": 19, "syscall": "read", "container": "web-2", "pod": "shop-1"},
                "web-ptrace",
            ),
            ({"cap": 19, "syscall": "read", "container": "web", "pod": "shop-1"}, "web-ptrace"),
            ({"cap": 19, "syscall": "readv", "container": "web", "pod": "shop-1"}, None),
            ({"cap": 19, "syscall": "read", "container": "web", "pod": "cart-1"}, None),
            ({"cap": 19, "syscall": "read", "container": "webapp", "pod": "shop-1"}, None),
        ],
    )
    def test_every_given_field_must_match(self, kw: dict[str, object], expected: str) -> None:
        """A rule matches when all its fields match; the first matching rule wins."""
        assert expected == _classify(_policy(self.POLICY), **kw)

    def test_first_matching_rule_wins(self) -> None:
        """Rules are tried in file order."""
        policy = _policy("""\
            rules:
              - {name: first, why: a, capability: CAP_CHOWN}
              - {name: second, why: b, capability: CAP_CHOWN, comm: x}
            """)
        assert "first" == _classify(policy, cap=0, comm="x")

    def test_cached_result_is_the_same_rule(self) -> None:
        """Repeated denials return the cached rule, identical to the first answer."""
        policy = _policy(self.POLICY)
        first = policy.classify(cap=25, syscall="x", comm="chronyd", **HOST)
        assert first is policy.classify(cap=25, syscall="x", comm="chronyd", **HOST)

    def test_cache_stays_bounded(self) -> None:
        """Churning pod names cannot grow the cache without bound."""
        policy = _policy(self.POLICY)
        for i in range(70_000):
            policy.classify(cap=1, syscall="x", comm="c", container="c", pod=f"p{i}", namespace="")
        assert 0 < policy.cache_size <= 65_536

    def test_empty_glob_matches_the_host(self) -> None:
        """namespace: "" matches host denials (empty namespace label)."""
        policy = _policy('rules: [{name: host, why: h, namespace: ""}]')
        assert ("host", None) == (
            _classify(policy, cap=1),
            _classify(policy, cap=1, namespace="default"),
        )

    def test_rule_fields_are_parsed(self) -> None:
        """A rule keeps its name, why (whitespace folded), line, and match sets."""
        policy = _policy(self.POLICY)
        assert (
            Rule(
                name="ntp",
                why="chrony probes CAP_SYS_TIME at start",
                line=2,
                capabilities=frozenset({24, 25}),
                comm=("chrony*",),
            )
            == policy.rules[0]
        )

    @given(cap=st.integers(0, CAP_LAST_CAP))
    def test_every_capability_name_round_trips(self, cap: int) -> None:
        """Any capability written by name matches exactly that capability number."""
        policy = _policy(f"rules: [{{name: r, why: w, capability: {cap_name(cap)}}}]")
        assert ("r", None) == (
            _classify(policy, cap=cap),
            _classify(policy, cap=(cap + 1) % (CAP_LAST_CAP + 1)),
        )


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "rules:\n  - name: a\n    why: b\n    capability: CAP_SYS_TIMEE\n",
                "policy p.yaml:4: unknown capability 'CAP_SYS_TIMEE' "
                "(e.g. CAP_SYS_TIME, sys_time, 25)",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    capability: [CAP_CHOWN, 99]\n",
                "policy p.yaml:4: capability number 99 is out of range 0-63",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    capabilities: CAP_CHOWN\n",
                "policy p.yaml:4: unknown key 'capabilities' in a rule; did you mean 'capability'?",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    capability: true\n",
                "policy p.yaml:4: 'capability' must be a name or number, not a boolean",
            ),
            (
                "rules:\n  - name: a\n    why: [b]\n    comm: x\n",
                "policy p.yaml:3: 'why' of rule 'a' must be a single value, not a list",
            ),
            (
                "rules:\n  - name: a\n    comm: x\n",
                "policy p.yaml:2: rule is missing required key 'why'",
            ),
            (
                "rules:\n  - name: a\n    why: ''\n    comm: x\n",
                "policy p.yaml:3: 'why' of rule 'a' must not be empty",
            ),
            (
                "rules:\n  - name: a\n    why: b\n",
                "policy p.yaml:2: rule 'a' would match every denial; give at least one of "
                "capability, syscall, comm, container, pod, namespace",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    syscall: mmapp\n",
                "policy p.yaml:4: unknown syscall 'mmapp'; did you mean 'mmap'?",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    comm: 12\n",
                "policy p.yaml:4: 'comm' must be text, not a number",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    comm: kube-controller-manager\n",
                "policy p.yaml:4: comm 'kube-controller-manager' can never match: the kernel "
                "keeps only the first 15 characters (write 'kube-controller')",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    container: []\n",
                "policy p.yaml:4: 'container' is an empty list (it would never match)",
            ),
            (
                "rules:\n  - {name: a, why: b, comm: x}\n  - {name: a, why: c, comm: y}\n",
                "policy p.yaml:3: duplicate rule name 'a' (first at line 2)",
            ),
            (
                "rules:\n  - name: a\n    why: b\n    comm: x\n    comm: y\n",
                "policy p.yaml:5: duplicate key 'comm' in a rule",
            ),
            ("rules:\n  - name: a\n   why: b\n", "policy p.yaml:3: YAML syntax error: "),
            ("rules: [\n", "policy p.yaml:2: YAML syntax error: "),
            ("", "policy p.yaml:1: empty policy; write 'rules: []' for a policy with no rules"),
            ("- a\n", "policy p.yaml:1: the policy must be a mapping of keys to values"),
            (
                "rule: []\n",
                "policy p.yaml:1: unknown key 'rule' in the policy; did you mean 'rules'?",
            ),
            ("version: 1\n", "policy p.yaml:1: missing key 'rules'"),
            ("version: 2\nrules: []\n", "policy p.yaml:1: unsupported 'version' (only 1 is known)"),
            ("rules: {}\n", "policy p.yaml:1: 'rules' must be a list of rules"),
            ("rules:\n  - just a string\n", "policy p.yaml:2: a rule must be a mapping"),
        ],
    )
    def test_bad_policy_names_file_line_and_reason(self, text: str, expected: str) -> None:
        """Each mistake fails with one line: policy FILE:LINE: reason."""
        message = _error(text)
        assert (expected, "\n") == (message[: len(expected)], "\n" if "\n" not in message else "")

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable file is reported with its path and the OS reason."""
        path = tmp_path / "nope.yaml"
        with pytest.raises(PolicyError) as info:
            Policy.load(path)
        assert f"policy {path}: cannot read: No such file or directory" == str(info.value)

    def test_load_reads_a_file_and_names_it_in_errors(self, tmp_path: Path) -> None:
        """Policy.load(path) parses the file and reports errors against that path."""
        good = tmp_path / "good.yaml"
        good.write_text("rules: [{name: r, why: w, capability: 25}]\n", encoding="utf-8")
        bad = tmp_path / "bad.yaml"
        bad.write_text("rules:\n  - {name: r, why: w, capability: CAP_NOPE}\n", encoding="utf-8")
        with pytest.raises(PolicyError) as info:
            Policy.load(bad)
        assert (("r",), f"policy {bad}:2: unknown capability") == (
            tuple(r.name for r in Policy.load(good).rules),
            str(info.value)[: len(f"policy {bad}:2: unknown capability")],
        )

    def test_is_a_capwatch_error(self) -> None:
        """PolicyError is a CapwatchError, so the CLI prints it as one line and exits 1."""
        assert (True, 1) == (issubclass(PolicyError, CapwatchError), PolicyError.exit_code)

    @given(st.text(max_size=200))
    def test_any_text_loads_or_fails_with_one_line(self, text: str) -> None:
        """Arbitrary input never escapes as another exception or a multi-line message."""
        message = ""
        try:
            Policy.from_text(text, source="fuzz.yaml")
        except PolicyError as e:
            message = str(e)
        assert (True, False) == (
            message == "" or message.startswith("policy fuzz.yaml"),
            "\n" in message,
        )
