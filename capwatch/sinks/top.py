"""`capwatch top`'s view model: rows of workload x capability x verdict with
rates and totals, sorted, filtered and laid out into W x H characters. Pure:
the terminal (curses) is in capwatch.commands.top.

Counts come from the kernel's exact count map (no per-event cost for allowed
checks), keyed by cgroup; each cgroup is named as everywhere else
(``identity_of``) and cgroups of one workload are summed. What the count map
cannot tell, the syscall and command seen most often for a row, comes from the
checks the pipeline writes to this sink (denials; every check with --all).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from capwatch.attribution.containers import Workload
from capwatch.attribution.workloads import identity_of
from capwatch.decode.caps import cap_name
from capwatch.pipeline import Check

__all__ = ["SORTS", "Row", "Status", "TopModel", "layout"]

#: Sort keys: denials first (unexpected ones, then known probes), then by rate
#: (the default); by rate; by total.
SORTS = ("denials", "rate", "total")
Key = tuple[str, int, bool]  # (workload, capability, denied)


def _label(container: str, pod: str, namespace: str) -> str:
    return f"{namespace}/{pod}/{container}" if pod else container


@dataclass(frozen=True)
class Row:
    workload: str
    cap: int
    denied: bool
    rate: float  # checks/s over the last interval
    total: int  # since capwatch attached
    syscall: str = ""  # the most seen (from the ring), "" when not seen
    comm: str = ""
    expected: bool = False  # denied, and every denial seen was a known probe (policy, outcome)

    @property
    def capability(self) -> str:
        return cap_name(self.cap)

    @property
    def verdict(self) -> str:
        if not self.denied:
            return "allowed"
        return "expected" if self.expected else "denied"

    def matches(self, text: str) -> bool:
        t = text.lower()
        return any(
            t in s.lower()
            for s in (self.workload, self.capability, self.verdict, self.syscall, self.comm)
        )


@dataclass
class Status:
    """The status line's counters."""

    lost_denials: int = 0
    lost_checks: int = 0
    suppressed: int = 0
    source: str = "live"
    note: str = ""


@dataclass
class _Seen:
    syscalls: Counter[str] = field(default_factory=Counter)
    comms: Counter[str] = field(default_factory=Counter)
    unexpected: int = 0  # denials no policy rule or outcome explains


class TopModel:
    """Totals and rates per row; also the pipeline sink that learns syscalls."""

    def __init__(self, resolve: Callable[[int], Workload], *, start_s: float = 0.0) -> None:
        self.resolve = resolve
        self.totals: dict[Key, int] = {}
        self.rates: dict[Key, float] = {}
        self._prev: dict[Key, int] = {}
        self._prev_t = start_s
        self.interval_s = 0.0
        self.updates = 0  # how many times the counts were read (the screen redraws on change)
        self._seen: dict[Key, _Seen] = {}

    # -- the pipeline sink ---------------------------------------------------

    def write(self, check: Check) -> None:
        key = (_label(check.container, check.pod, check.namespace), check.cap, check.denied)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= 50_000:
                self._seen.clear()
            seen = self._seen[key] = _Seen()
        seen.syscalls[check.syscall] += check.count
        seen.comms[check.comm] += check.count
        if check.denied and not check.expected:
            seen.unexpected += check.count

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    # -- counts ----------------------------------------------------------------

    def update(self, counts: Mapping[tuple[int, int, bool], int], now_s: float) -> None:
        """The count map read at ``now_s``: totals, and rates since the last read."""
        totals: dict[Key, int] = {}
        for (cg, cap, denied), n in counts.items():
            ident = identity_of(self.resolve(cg))
            key = (_label(ident["container"], ident["pod"], ident["namespace"]), cap, denied)
            totals[key] = totals.get(key, 0) + n
        dt = now_s - self._prev_t
        self.interval_s = dt
        self.rates = {
            k: max(0, n - self._prev.get(k, 0)) / dt if dt > 0 else 0.0 for k, n in totals.items()
        }
        self.totals = totals
        self._prev = totals
        self._prev_t = now_s
        self.updates += 1

    def rows(self, *, sort: str = "denials", text: str = "") -> list[Row]:
        out = []
        for key, total in self.totals.items():
            seen = self._seen.get(key)
            row = Row(
                workload=key[0],
                cap=key[1],
                denied=key[2],
                rate=self.rates.get(key, 0.0),
                total=total,
                syscall=seen.syscalls.most_common(1)[0][0] if seen else "",
                comm=seen.comms.most_common(1)[0][0] if seen else "",
                expected=key[2] and seen is not None and seen.unexpected == 0,
            )
            if not text or row.matches(text):
                out.append(row)
        order: dict[str, Callable[[Row], tuple[object, ...]]] = {
            "denials": lambda r: (
                not r.denied,
                r.expected,
                -r.rate,
                -r.total,
                r.workload,
                r.cap,
            ),
            "rate": lambda r: (-r.rate, -r.total, r.workload, r.cap, r.denied),
            "total": lambda r: (-r.total, -r.rate, r.workload, r.cap, r.denied),
        }
        return sorted(out, key=order[sort])


def _fmt_rate(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}"


def layout(
    rows: list[Row],
    status: Status,
    width: int,
    height: int,
    *,
    sort: str = "denials",
    text: str = "",
    prompt: str | None = None,
) -> list[tuple[str, str]]:
    """The screen as (line, style) pairs, at most ``height`` lines of at most
    ``width`` characters. Styles: title, status, header, denied, expected,
    allowed, help."""
    width = max(width, 40)
    comm_w = 15 if width >= 100 else 0
    fixed = 20 + 8 + 9 + 11 + 14 + 5 + (comm_w + 1 if comm_w else 0)
    wl_w = max(8, width - fixed - 1)

    def line(*cells: str) -> str:
        wl, cap, verdict, rate, total, sc, comm = cells
        s = (
            f"{wl[:wl_w]:<{wl_w}} {cap[:20]:<20} {verdict[:8]:<8} {rate[:9]:>9}"
            f" {total[:11]:>11} {sc[:14]:<14}"
        )
        if comm_w:
            s += f" {comm[:comm_w]:<{comm_w}}"
        return s[:width].rstrip()

    denied_rate = sum(r.rate for r in rows if r.denied)
    all_rate = sum(r.rate for r in rows)
    title = (
        f"capwatch top  sort:{sort}"
        + (f"  filter:{text}" if text else "")
        + f"  checks/s {_fmt_rate(all_rate)}  denied/s {_fmt_rate(denied_rate)}  {status.source}"
    )
    stat = (
        f"lost: denials {status.lost_denials} checks {status.lost_checks}"
        f"  rate-limited denials {status.suppressed}" + (f"  {status.note}" if status.note else "")
    )
    out: list[tuple[str, str]] = [(title[:width], "title"), (stat[:width], "status")]
    out.append(
        (line("WORKLOAD", "CAPABILITY", "VERDICT", "RATE/s", "TOTAL", "SYSCALL", "COMM"), "header")
    )
    room = max(0, height - len(out) - 1)
    shown = rows[:room]
    if len(rows) > room > 0:
        shown = rows[: room - 1]
    for r in shown:
        out.append(
            (
                line(
                    r.workload,
                    r.capability,
                    r.verdict,
                    _fmt_rate(r.rate),
                    str(r.total),
                    r.syscall or "-",
                    r.comm or "-",
                ),
                "expected" if r.expected else "denied" if r.denied else "allowed",
            )
        )
    if len(shown) < len(rows):
        out.append((f"... {len(rows) - len(shown)} more rows"[:width], "help"))
    if prompt is not None:
        foot = f"filter: {prompt}_  (Enter apply, Esc cancel)"
    else:
        foot = "q quit  d denials first  r rate  t total  / filter"
    out.append((foot[:width], "help"))
    return out[:height]
