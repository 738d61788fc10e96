"""Copy issue 13's CLI-level tests so that they run 8e1265c's CLI (python -m
capwatch.cli, from that commit's worktree) instead of this branch's: the same
tests, inputs and assertions; only the entry point (module and working directory)
changes. Used by run.sh; not part of the suite.

    python tests/on_8e1265c/adapt.py OLD_WORKTREE OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

#: The modules copied; the shim appended rebinds what their tests call at run time.
SOURCES = ("tests/kernel/test_refusals.py", "tests/unit/commands/test_cli.py")

SHIM = """

# --- tests/on_8e1265c/adapt.py: run 8e1265c's CLI from its worktree -------------
OLD_TREE = {old!r}
REPO = Path(OLD_TREE)  # cwd of every capwatch subprocess
CAPWATCH = [sys.executable, "-m", "capwatch.cli"]


def run_capwatch(*args: str, timeout: float = 60, **kw: object) -> Any:
    import subprocess as sp

    return sp.run(
        [*CAPWATCH, *args], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=OLD_TREE, **kw,
    )
"""


def adapt(text: str, old: str) -> str:
    text = text.replace('"capwatch.commands.cli"', '"capwatch.cli"')
    for imp in ("import sys\n", "from pathlib import Path\n", "from typing import Any\n"):
        if imp not in text:
            text = text.replace(
                "from __future__ import annotations\n",
                f"from __future__ import annotations\n{imp}",
                1,
            )
    return text + SHIM.format(old=old)


def main() -> None:
    old, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for src in SOURCES:
        name = "old_" + Path(src).name
        (out / name).write_text(adapt((REPO / src).read_text(), str(old)))
        print(out / name)


if __name__ == "__main__":
    main()
