"""Expected-denials policy: YAML rules naming capability denials that are known
and harmless (the kernel probing a capability it can do without).

A rule matches a denial when every match field it gives matches; the first
matching rule wins. Match fields take one value or a list (any element may
match): ``capability`` (CAP_SYS_MODULE, sys_module or 16), ``syscall`` (a name
from the syscall tables, or a glob), ``comm``/``container``/``pod``/``namespace``
(fnmatch globs, case-sensitive). Each rule needs ``name`` and ``why``.

A bad file fails at start-up with :class:`PolicyError`, one line:
``policy FILE:LINE: reason``. The shipped default is ``policies/default.yaml``.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final

import yaml

from capwatch.decode.caps import parse_cap
from capwatch.decode.syscalls import syscall_table
from capwatch.errors import PolicyError

__all__ = ["DEFAULT_POLICY", "Policy", "PolicyError", "Rule"]

#: Where the shipped default policy lives (package data).
DEFAULT_POLICY: Final = "policies/default.yaml"

_GLOB_FIELDS: Final = ("comm", "container", "pod", "namespace")
_MATCH_FIELDS: Final = ("capability", "syscall", *_GLOB_FIELDS)
_RULE_KEYS: Final = ("name", "why", *_MATCH_FIELDS)
_TOP_KEYS: Final = ("version", "rules")
_TASK_COMM_LEN: Final = 15  # TASK_COMM_LEN 16 with the NUL: the kernel truncates comm
_GLOB_CHARS: Final = frozenset("*?[")
_KNOWN_SYSCALLS: Final = frozenset(syscall_table("x86_64").values()) | frozenset(
    syscall_table("aarch64").values()
)
_DEGRADED_SYSCALL: Final = re.compile(r"syscall:\d+|-")  # capwatch.decode.syscalls' fallbacks
_CACHE_MAX: Final = 65536

_Matcher = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Rule:
    """One expected-denial rule. ``None`` for a field means "not constrained"."""

    name: str
    why: str
    line: int  # where the rule starts in its file, 1-based
    capabilities: frozenset[int] | None = None
    syscalls: tuple[str, ...] | None = None
    comm: tuple[str, ...] | None = None
    container: tuple[str, ...] | None = None
    pod: tuple[str, ...] | None = None
    namespace: tuple[str, ...] | None = None


class _Compiled:
    """A rule with its globs compiled once, so matching is a few calls."""

    __slots__ = ("caps", "fields", "rule")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.caps = rule.capabilities
        pairs = (
            ("syscall", rule.syscalls),
            ("comm", rule.comm),
            ("container", rule.container),
            ("pod", rule.pod),
            ("namespace", rule.namespace),
        )
        self.fields: tuple[tuple[int, _Matcher], ...] = tuple(
            (i, _matcher(patterns)) for i, (_, patterns) in enumerate(pairs) if patterns is not None
        )

    def matches(self, cap: int, values: tuple[str, str, str, str, str]) -> bool:
        if self.caps is not None and cap not in self.caps:
            return False
        return all(match(values[i]) for i, match in self.fields)


def _matcher(patterns: tuple[str, ...]) -> _Matcher:
    exact = frozenset(p for p in patterns if not _GLOB_CHARS & set(p))
    globs = [p for p in patterns if _GLOB_CHARS & set(p)]
    if not globs:
        return exact.__contains__
    rx = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
    return lambda v: v in exact or rx.match(v) is not None


class Policy:
    """An ordered list of rules with a per-denial cache (denials repeat)."""

    def __init__(self, rules: tuple[Rule, ...] = (), source: str = "<none>") -> None:
        self.rules = rules
        self.source = source
        self._compiled = tuple(_Compiled(r) for r in rules)
        self._cache: dict[tuple[int, str, str, str, str, str], Rule | None] = {}

    def __repr__(self) -> str:
        return f"Policy({len(self.rules)} rules from {self.source})"

    @property
    def cache_size(self) -> int:
        """How many denial shapes the classification cache holds (bounded)."""
        return len(self._cache)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Policy:
        """Read a policy file; ``None`` loads the shipped default.

        Raises PolicyError (one line, with file and line) for anything wrong.
        """
        if path is None:
            res = resources.files("capwatch.diagnose").joinpath(DEFAULT_POLICY)
            return cls.from_text(res.read_text(encoding="utf-8"), source=str(res))
        source = os.fspath(path)
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PolicyError(source, None, f"cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise PolicyError(source, None, f"not UTF-8 text: {e.reason}") from None
        return cls.from_text(text, source=source)

    @classmethod
    def from_text(cls, text: str, source: str = "<string>") -> Policy:
        """Parse policy YAML held in a string (``source`` names it in errors)."""
        return cls(_parse(text, source), source)

    def classify(
        self, *, cap: int, syscall: str, comm: str, container: str, pod: str, namespace: str
    ) -> Rule | None:
        """The first rule matching this denial, or None (an unexpected denial)."""
        key = (cap, syscall, comm, container, pod, namespace)
        try:
            return self._cache[key]
        except KeyError:
            pass
        values = (syscall, comm, container, pod, namespace)
        found = next((c.rule for c in self._compiled if c.matches(cap, values)), None)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()  # bounded: pod names churn; a refill costs one pass each
        self._cache[key] = found
        return found

    def classify_without_comm(
        self, *, cap: int, syscall: str, container: str, pod: str, namespace: str
    ) -> Rule | NeedsComm | None:
        """Classify a denial whose comm is not known (one the kernel counted but
        did not send: capwatch/held.py). Rules are tried in order as by
        :meth:`classify`; the first rule that matches on everything but comm
        decides: its verdict if it has no comm condition, else NEEDS_COMM (the
        comm could make it match or not, and a later rule may not be used in its
        place). None: no rule could match whatever the comm (unexpected)."""
        values = (syscall, "", container, pod, namespace)
        for c in self._compiled:
            if c.caps is not None and cap not in c.caps:
                continue
            if all(match(values[i]) for i, match in c.fields if i != 1):
                return c.rule if c.rule.comm is None else NEEDS_COMM
        return None


class NeedsComm:
    """The verdict of :meth:`Policy.classify_without_comm` when a rule needs comm."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEEDS_COMM"


NEEDS_COMM: Final = NeedsComm()


# -- parsing: walk the composed node tree, so every error knows its line ------


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _parse(text: str, source: str) -> tuple[Rule, ...]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise PolicyError(source, line, f"YAML syntax error: {reason}") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, None, f"YAML error: {e}") from None
    if root is None:
        raise PolicyError(source, 1, "empty policy; write 'rules: []' for a policy with no rules")
    top = _mapping(root, source, "the policy", _TOP_KEYS)
    if "version" in top:
        vnode = top["version"][1]
        if _scalar(vnode, source, "'version'") != 1:
            raise PolicyError(source, _line(vnode), "unsupported 'version' (only 1 is known)")
    if "rules" not in top:
        raise PolicyError(source, _line(root), "missing key 'rules'")
    rules_node = top["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode):
        raise PolicyError(source, _line(rules_node), "'rules' must be a list of rules")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for item in rules_node.value:
        rule = _rule(item, source)
        if rule.name in seen:
            raise PolicyError(
                source,
                rule.line,
                f"duplicate rule name {rule.name!r} (first at line {seen[rule.name]})",
            )
        seen[rule.name] = rule.line
        rules.append(rule)
    return tuple(rules)


def _mapping(
    node: yaml.Node, source: str, what: str, known: tuple[str, ...]
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise PolicyError(source, _line(node), f"{what} must be a mapping of keys to values")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in node.value:
        key = knode.value if isinstance(knode, yaml.ScalarNode) else None
        if not isinstance(key, str) or key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            also = f"; did you mean {hint[0]!r}?" if hint else f" (known: {', '.join(known)})"
            raise PolicyError(source, _line(knode), f"unknown key {key!r} in {what}{also}")
        if key in out:
            raise PolicyError(source, _line(knode), f"duplicate key {key!r} in {what}")
        out[key] = (knode, vnode)
    return out


def _scalar(node: yaml.Node, source: str, what: str) -> object:
    if not isinstance(node, yaml.ScalarNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        raise PolicyError(source, _line(node), f"{what} must be a single value, not {kind}")
    return yaml.SafeLoader("").construct_object(node)


def _text(node: yaml.Node, source: str, what: str) -> str:
    value = _scalar(node, source, what)
    if not isinstance(value, str):
        raise PolicyError(source, _line(node), f"{what} must be text, not {_kind(value)}")
    if not value.strip():
        raise PolicyError(source, _line(node), f"{what} must not be empty")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "a value")


def _items(node: yaml.Node, source: str, what: str) -> list[yaml.Node]:
    """One value or a non-empty list of values."""
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise PolicyError(
                source, _line(node), f"{what} is an empty list (it would never match)"
            )
        return list(node.value)
    return [node]


def _rule(node: yaml.Node, source: str) -> Rule:
    fields = _mapping(node, source, "a rule", _RULE_KEYS)
    for required in ("name", "why"):
        if required not in fields:
            raise PolicyError(source, _line(node), f"rule is missing required key {required!r}")
    name = _text(fields["name"][1], source, "'name'").strip()
    why = " ".join(_text(fields["why"][1], source, f"'why' of rule {name!r}").split())
    if not any(f in fields for f in _MATCH_FIELDS):
        raise PolicyError(
            source,
            _line(node),
            f"rule {name!r} would match every denial; give at least one of "
            + ", ".join(_MATCH_FIELDS),
        )
    caps: frozenset[int] | None = None
    if "capability" in fields:
        caps = frozenset(
            _cap(n, source) for n in _items(fields["capability"][1], source, "'capability'")
        )
    syscalls: tuple[str, ...] | None = None
    if "syscall" in fields:
        syscalls = tuple(
            _syscall(n, source) for n in _items(fields["syscall"][1], source, "'syscall'")
        )
    globs: dict[str, tuple[str, ...] | None] = dict.fromkeys(_GLOB_FIELDS)
    for field in _GLOB_FIELDS:
        if field in fields:
            nodes = _items(fields[field][1], source, repr(field))
            globs[field] = tuple(_glob(n, source, field) for n in nodes)
    return Rule(
        name=name,
        why=why,
        line=_line(node),
        capabilities=caps,
        syscalls=syscalls,
        comm=globs["comm"],
        container=globs["container"],
        pod=globs["pod"],
        namespace=globs["namespace"],
    )


def _cap(node: yaml.Node, source: str) -> int:
    value = _scalar(node, source, "'capability'")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PolicyError(
            source, _line(node), f"'capability' must be a name or number, not {_kind(value)}"
        )
    try:
        return parse_cap(str(value))
    except ValueError as e:
        raise PolicyError(source, _line(node), str(e)) from None


def _syscall(node: yaml.Node, source: str) -> str:
    value = _text(node, source, "'syscall'").strip()
    if _GLOB_CHARS & set(value) or value in _KNOWN_SYSCALLS or _DEGRADED_SYSCALL.fullmatch(value):
        return value
    hint = difflib.get_close_matches(value, _KNOWN_SYSCALLS, n=1)
    also = f"; did you mean {hint[0]!r}?" if hint else ""
    raise PolicyError(source, _line(node), f"unknown syscall {value!r}{also}")


def _glob(node: yaml.Node, source: str, field: str) -> str:
    value = _scalar(node, source, repr(field))
    if not isinstance(value, str):
        raise PolicyError(source, _line(node), f"{field!r} must be text, not {_kind(value)}")
    if field == "comm" and not _GLOB_CHARS & set(value) and len(value) > _TASK_COMM_LEN:
        raise PolicyError(
            source,
            _line(node),
            f"comm {value!r} can never match: the kernel keeps only the first "
            f"{_TASK_COMM_LEN} characters (write {value[:_TASK_COMM_LEN]!r})",
        )
    return value
