"""`capwatch top`: a full-screen live view (curses), or one snapshot (--once).

Live: trace's pipeline (denials from the ring, attributed, classified) writes
to the view model's sink; the kernel's count map is read once a second for
exact totals and rates. The screen is drawn from the consumer's own tick
(after each drain), so there is one thread and the keys are read without
blocking. `--from FILE` plays a recording at its own pace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from capwatch.diagnose.policy import Policy
from capwatch.errors import UsageError
from capwatch.sinks.top import Status, TopModel, layout

__all__ = ["Screen", "run_top"]

_SORT_KEYS = {ord("d"): "denials", ord("r"): "rate", ord("t"): "total"}


class Screen:
    """The curses side: keys in, the layout out. ``state`` holds sort, filter
    and the filter being typed; ``quit`` is set by q."""

    def __init__(self, stdscr: Any, sort: str, text: str) -> None:
        import curses

        self.curses = curses
        self.win = stdscr
        self.sort = sort
        self.text = text
        self.prompt: str | None = None
        self.quit = False
        curses.curs_set(0)
        stdscr.nodelay(True)
        stdscr.keypad(True)
        self.styles = {
            "denied": curses.A_BOLD,
            "expected": curses.A_DIM,
            "header": curses.A_REVERSE,
            "title": curses.A_BOLD,
        }
        if curses.has_colors():
            curses.start_color()
            curses.use_default_colors()
            curses.init_pair(1, curses.COLOR_RED, -1)
            self.styles["denied"] = curses.color_pair(1) | curses.A_BOLD

    def keys(self) -> bool:
        """Read pending keys; True if the screen should be redrawn now."""
        changed = False
        while True:
            ch = self.win.getch()
            if ch == -1:
                return changed
            changed = True
            if self.prompt is not None:
                if ch in (10, 13, self.curses.KEY_ENTER):
                    self.text, self.prompt = self.prompt, None
                elif ch == 27:
                    self.prompt = None
                elif ch in (8, 127, self.curses.KEY_BACKSPACE):
                    self.prompt = self.prompt[:-1]
                elif 32 <= ch < 127:
                    self.prompt += chr(ch)
            elif ch in (ord("q"), ord("Q")):
                self.quit = True
            elif ch in _SORT_KEYS:
                self.sort = _SORT_KEYS[ch]
            elif ch == ord("/"):
                self.prompt = self.text
            elif ch == self.curses.KEY_RESIZE:
                pass

    def draw(self, model: TopModel, status: Status) -> None:
        h, w = self.win.getmaxyx()
        lines = layout(
            model.rows(sort=self.sort, text=self.text),
            status,
            w,
            h,
            sort=self.sort,
            text=self.text,
            prompt=self.prompt,
        )
        self.win.erase()  # erase + one refresh: curses sends only what changed (no flicker)
        for y, (text, style) in enumerate(lines):
            with contextlib.suppress(self.curses.error):
                self.win.addnstr(y, 0, text, w - 1, self.styles.get(style, 0))
        self.win.refresh()


def _snapshot(model: TopModel, status: Status, args: argparse.Namespace, out: TextIO) -> None:
    cols, _ = shutil.get_terminal_size((80, 24))
    rows = model.rows(sort=args.sort, text=args.filter or "")
    for text, _style in layout(
        rows, status, cols, len(rows) + 5, sort=args.sort, text=args.filter or ""
    ):
        if _style != "help":
            out.write(text + "\n")


def run_top(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not args.once and not (sys.stdin.isatty() and out.isatty()):
        raise UsageError("top: needs a terminal (use --once for one snapshot)")
    if args.from_:
        return _run_from(args, out, err)
    return _run_live(args, out, err)


def _loop(
    args: argparse.Namespace,
    model: TopModel,
    status: Status,
    run: Callable[[Callable[[], bool]], None],
) -> None:
    """Full screen: ``run(tick)`` drives; ``tick()`` returns True to stop."""
    import curses

    def main(stdscr: Any) -> None:
        screen = Screen(stdscr, args.sort, args.filter or "")
        screen.draw(model, status)
        drawn = [model.updates]

        def tick() -> bool:
            if screen.keys() or model.updates != drawn[0]:
                drawn[0] = model.updates
                screen.draw(model, status)
            return screen.quit

        run(tick)

    os.environ.setdefault("ESCDELAY", "25")
    curses.wrapper(main)  # restores the terminal however main ends


def _run_live(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch.attribution.containers import Attributor
    from capwatch.commands.trace import trace_pipeline
    from capwatch.kernel import bpf
    from capwatch.kernel.session import Session, stop_on_signals

    config = bpf.ProgramConfig(emit_all=args.all, check_pages=args.ring_pages)
    stop = threading.Event()
    stop_on_signals(stop)
    session = Session(config, args.attach, kernel_headers=args.kernel_headers)
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    model = TopModel(attributor.resolve, start_s=time.monotonic())
    status = Status(source=f"live via {session.mode}")
    pipeline = trace_pipeline(
        attributor.resolve,
        [model],
        policy=Policy.load(args.policy),
        outcome=False,
        proc_root=args.proc_root,
        note_pid=attributor.note_pid,
    )
    last = [0.0]

    def refresh() -> None:
        now = time.monotonic()
        if now - last[0] < args.interval:
            return
        last[0] = now
        model.update(session.program.read_counts(), now)
        st = session.program.read_stats()
        status.lost_denials, status.lost_checks = st["lost_denials"], st["lost_checks"]
        status.suppressed = st["suppressed"]

    try:
        if args.once:
            refresh()
            t_end = time.monotonic() + args.interval

            def until() -> None:
                pipeline.tick()
                if time.monotonic() >= t_end:
                    stop.set()

            session.run(stop, pipeline.on_batch, on_tick=until)
            pipeline.close()
            last[0] = 0.0
            refresh()
            _snapshot(model, status, args, out)
            return 0

        def run(tick: Callable[[], bool]) -> None:
            def on_tick() -> None:
                pipeline.tick()
                refresh()
                if tick():
                    stop.set()

            refresh()
            session.run(stop, pipeline.on_batch, on_tick=on_tick)

        _loop(args, model, status, run)
        pipeline.close()
    finally:
        session.close()
        attributor.close()
    return 0


def _run_from(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch.commands.trace import trace_pipeline
    from capwatch.record.format import Drain
    from capwatch.record.replay import Recording

    rec = Recording(args.from_)
    model = TopModel(rec.resolve)
    status = Status(source=f"recording of {rec.host.get('hostname', '?')}")
    pipeline = trace_pipeline(
        rec.resolve,
        [model],
        policy=Policy.load(args.policy),
        outcome=False,
        snapshot=rec.snapshot,
        clock=rec.clock,
        monotonic_ns=rec.now_ns,
    )
    first: list[int] = []

    def on_drain(d: Drain) -> None:
        if not first:
            first.append(d.t_ns)
            model.update({}, d.t_ns / 1e9)  # the rates' start: the recording's first drain
        if d.counts is not None:
            model.update(d.counts, d.t_ns / 1e9)
        if d.stats is not None:
            status.lost_denials = d.stats.get("lost_denials", 0)
            status.lost_checks = d.stats.get("lost_checks", 0)
            status.suppressed = d.stats.get("suppressed", 0)

    if args.once:
        rec.feed(pipeline, on_drain=on_drain)
        _snapshot(model, status, args, out)
        if rec.cut is not None:
            err.write(f"capwatch: {rec.cut}\n")
            return 1
        return 0

    def run(tick: Callable[[], bool]) -> None:
        t0 = time.monotonic()

        def paced(d: Drain) -> None:
            on_drain(d)
            while True:  # play at the recording's pace
                if tick():
                    raise _Quit
                if time.monotonic() - t0 >= (d.t_ns - first[0]) / 1e9:
                    return
                time.sleep(0.02)

        try:
            rec.feed(pipeline, on_drain=paced)
            status.note = "end of recording" + (" (cut short)" if rec.cut else "")
            while not tick():
                time.sleep(0.05)
        except _Quit:
            pass

    _loop(args, model, status, run)
    return 0


class _Quit(Exception):
    pass
