"""One boot of each Debian kernel per pytest session, both at once (tests/vm/harness.py).

CAPWATCH_VM_OUT=DIR keeps each guest's output in DIR/<series>/;
CAPWATCH_VM_RESULTS=DIR judges such a kept run again without booting.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import harness


@pytest.fixture(scope="session")
def vm_runs(request: pytest.FixtureRequest) -> Iterator[harness.Runs]:
    runs = harness.Runs()
    replay = os.environ.get("CAPWATCH_VM_RESULTS")
    if replay:  # judge a finished run again (DIR/<series>/results.json), without booting
        for series in harness.SERIES:
            path = Path(replay) / series / "results.json"
            if path.exists():
                runs.results[series] = json.loads(path.read_text())
            else:
                runs.errors[series] = f"{path} does not exist"
        yield runs
        return
    why = harness.qemu_missing()
    if why is not None:
        runs.skip = why
        yield runs
        return
    if os.geteuid() != 0:
        runs.skip = "needs root: downloads kernels with apt-get and boots them with QEMU"
        yield runs
        return
    kernels = []
    for series in harness.SERIES:
        try:
            kernels.append(harness.fetch(series))
        except (harness.HarnessError, OSError) as exc:
            runs.errors[series] = str(exc)
    keep = os.environ.get("CAPWATCH_VM_OUT")  # keep the guests' output there
    with tempfile.TemporaryDirectory(prefix="capwatch-vm-") as tmp:
        d = keep or tmp
        if kernels:
            runs.accel, runs.accel_why = harness.choose_accel(kernels[0])
            boots = [harness.Boot(k, Path(d) / k.series, runs.accel) for k in kernels]
            for b in boots:
                try:
                    runs.results[b.kernel.series] = b.wait()
                except harness.HarnessError as exc:
                    runs.errors[b.kernel.series] = str(exc)
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"vm: accelerator {runs.accel} ({runs.accel_why})")
                for r in runs.results.values():
                    reporter.write_line(
                        f"vm: Debian {r['host']['release']}: booted and ran in"
                        f" {r['host']['seconds']:.0f} s under {runs.accel}"
                    )
        yield runs
