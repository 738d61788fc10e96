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

    def test_concurrent_starts_all_find_the_tree(self, debian: Path) -> None:
        """Processes starting at once on a fresh machine (trace and serve after a boot)
        each find the merged tree: none sees or trips over another's half-built farm
        (one of five failed with "no kernel header tree" in a VM before)."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(16) as pool:
            for round_ in range(8):  # each round a fresh machine: an empty work dir
                work = debian / f"work{round_}"
                kw = {
                    "release": "6.18.0",
                    "modules_dir": str(debian / "lib/modules"),
                    "src_dir": str(debian / "usr/src"),
                    "work_dir": str(work),
                }
                paths = pool.starmap(_find_path, [(kw,)] * 16)
                assert 1 == len(set(paths)), paths
                merged = Path(paths[0])
                assert (merged / ".capwatch-merged").exists()
                assert (merged / "include/generated/autoconf.h").exists()
                assert [merged.name] == [p.name for p in work.iterdir()]  # no leftovers

    def test_half_built_farm_is_replaced(self, debian: Path) -> None:
        """A farm left without its stamp (a capwatch that died building it) is rebuilt."""
        stale = debian / "work/kernel-headers-linux-headers-6.1.0-56-amd64"
        (stale / "include").mkdir(parents=True)
        h = find_headers(
            release="6.18.0",
            modules_dir=str(debian / "lib/modules"),
            src_dir=str(debian / "usr/src"),
            work_dir=str(debian / "work"),
        )
        assert str(stale) == h.path
        assert (stale / ".capwatch-merged").exists()
        assert (stale / "include/linux/kconfig.h").exists()

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


def _find_path(kw: dict[str, str]) -> str:
    try:
        return find_headers(**kw).path  # type: ignore[arg-type]
    except HeadersError as exc:  # what a process that lost the race said
        return f"failed: {exc}"
