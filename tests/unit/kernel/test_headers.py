"""Finding a kernel header tree for BCC, on fake trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from capwatch.errors import HeadersError
from capwatch.kernel.headers import find_headers


def _common(root: Path, name: str) -> Path:
    d = root / "usr/src" / name
    (d / "include/linux").mkdir(parents=True)
    (d / "include/linux/kconfig.h").write_text("/* kconfig */\n")
    (d / "include/uapi").mkdir()
    (d / "arch/x86/include/asm").mkdir(parents=True)
    (d / "arch/x86/include/asm/ptrace.h").write_text("")
    (d / "arch/arm64").mkdir(parents=True)
    (d / "scripts").mkdir()
    return d


def _arch(root: Path, name: str) -> Path:
    d = root / "usr/src" / name
    (d / "include/generated").mkdir(parents=True)
    (d / "include/generated/autoconf.h").write_text("#define CONFIG_X86_64 1\n")
    (d / "include/config").mkdir()
    (d / "arch/x86/include/generated").mkdir(parents=True)
    (d / "Makefile").write_text("include ../common/Makefile\n")
    return d


@pytest.fixture
def debian(tmp_path: Path) -> Path:
    _common(tmp_path, "linux-headers-6.1.0-9-common")
    _arch(tmp_path, "linux-headers-6.1.0-9-amd64")
    _common(tmp_path, "linux-headers-6.1.0-56-common")
    _arch(tmp_path, "linux-headers-6.1.0-56-amd64")
    (tmp_path / "lib/modules").mkdir(parents=True)
    return tmp_path


class TestFindHeaders:
    def test_host_tree_wins(self, debian: Path) -> None:
        """The host's /lib/modules/<release>/build is used as is, with no env."""
        build = debian / "lib/modules/6.18.0/build"
        build.parent.mkdir(parents=True)
        build.symlink_to(debian / "usr/src/linux-headers-6.1.0-56-common")
        h = find_headers(
            release="6.18.0",
            modules_dir=str(debian / "lib/modules"),
            src_dir=str(debian / "usr/src"),
            work_dir=str(debian / "work"),
        )
        assert ("host", {}) == (h.source, h.env)

    def test_shipped_debian_split_tree_is_merged(
        self, debian: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without host headers the newest Debian split tree is merged into one directory for BCC."""
        monkeypatch.delenv("CAPWATCH_KERNEL_HEADERS", raising=False)
        h = find_headers(
            release="6.18.0",
            modules_dir=str(debian / "lib/modules"),
            src_dir=str(debian / "usr/src"),
            work_dir=str(debian / "work"),
        )
        merged = Path(h.path)
        assert "shipped" == h.source
        assert {"BCC_KERNEL_SOURCE": str(merged)} == h.env
        assert "kernel-headers-linux-headers-6.1.0-56-amd64" == merged.name
        # common's files, the arch half's generated files laid over them
        assert (merged / "include/linux/kconfig.h").exists()
        assert (merged / "include/generated/autoconf.h").exists()
        assert (merged / "arch/x86/include/asm/ptrace.h").exists()
        assert (merged / "arch/x86/include/generated").is_dir()
        assert (merged / "Makefile").read_text().startswith("include")

    def test_merge_is_reused(self, debian: Path) -> None:
        """A second call reuses the merged tree instead of rebuilding it."""
        kw = {
            "release": "6.18.0",
            "modules_dir": str(debian / "lib/modules"),
            "src_dir": str(debian / "usr/src"),
            "work_dir": str(debian / "work"),
        }
        first = find_headers(**kw)  # type: ignore[arg-type]
        stamp = Path(first.path) / ".capwatch-merged"
        mtime = stamp.stat().st_mtime_ns
        assert first == find_headers(**kw)  # type: ignore[arg-type]
        assert mtime == stamp.stat().st_mtime_ns

    def test_explicit_wins(self, debian: Path) -> None:
        """--kernel-headers DIR is used before anything else."""
        common = debian / "usr/src/linux-headers-6.1.0-9-common"
        h = find_headers(
            str(common),
            release="6.18.0",
            modules_dir=str(debian / "lib/modules"),
            src_dir=str(debian / "usr/src"),
            work_dir=str(debian / "work"),
        )
        assert ("explicit", str(common)) == (h.source, h.path)

    def test_explicit_not_a_tree(self, tmp_path: Path) -> None:
        """An explicit directory that is no header tree is a one-line HeadersError."""
        with pytest.raises(HeadersError, match="is not a kernel header tree"):
            find_headers(str(tmp_path), work_dir=str(tmp_path / "w"))

    def test_none_found(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """No tree anywhere: a HeadersError that says how to get one."""
        monkeypatch.delenv("CAPWATCH_KERNEL_HEADERS", raising=False)
        (tmp_path / "src").mkdir()
        with pytest.raises(HeadersError, match="install linux-headers-amd64") as exc:
            find_headers(
                release="6.18.0",
                modules_dir=str(tmp_path / "mods"),
                src_dir=str(tmp_path / "src"),
                work_dir=str(tmp_path / "w"),
            )
        assert "\n" not in str(exc.value)
