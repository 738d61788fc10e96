#!/usr/bin/env bash
# Prepare a Debian 12 host (root) for capwatch: packages, kernel headers for
# BCC, tracefs/debugfs, and a venv that sees Debian's bcc. Idempotent: a second
# run checks and changes nothing.
#
#   deploy/host-setup.sh [--venv DIR] [--no-test-deps]
set -euo pipefail

venv=".venv"
test_deps=1
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --no-test-deps) test_deps=0; shift ;;
    *) echo "host-setup: unknown argument: $1" >&2; exit 2 ;;
  esac
done

say() { printf 'host-setup: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "host-setup: must run as root (BPF, apt, mounts)" >&2; exit 1; }

# 1. Debian packages. bcc comes from Debian (python3-bpfcc); the PyPI package
#    named "bcc" is an unrelated project and must never be installed.
# python3-cap-ng: libcap-ng's bindings for serve's privilege drop (the venv
# uses the system site packages, so Debian's module is seen there).
pkgs=(python3-bpfcc bpfcc-tools python3-venv python3-numpy python3-cap-ng libcap2-bin util-linux bpftool)
if [ "$test_deps" = 1 ]; then
  # real containers (podman; docker.io 20.10 and containerd 1.6, whose daemons the
  # tests start themselves in temporary directories), a real Prometheus, and a
  # peer for the benchmark
  pkgs+=(podman runc busybox-static prometheus bpftrace clang-format debootstrap iproute2
    docker.io containerd)
  # QEMU and kmod (depmod) boot Debian's 6.1 and 6.12 kernels for tests/vm
  pkgs+=(qemu-system-x86 kmod)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
kver=$(uname -r)
need_headers=0
# A full tree, or Debian's split one (build = -amd64, source = -common).
[ -e "/lib/modules/$kver/build/include/linux/kconfig.h" ] \
  || [ -e "/lib/modules/$kver/source/include/linux/kconfig.h" ] || need_headers=1
if [ "$need_headers" = 1 ] && ! compgen -G '/usr/src/linux-headers-*-amd64' >/dev/null; then
  missing+=(linux-headers-amd64)
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "packages present"
fi

# 2. A kernel header tree for BCC. The host's own tree wins; otherwise link
#    Debian's newest linux-headers-*-amd64 (and its -common) as build/source.
#    capwatch's BPF program reads no kernel struct layout, so a tree from
#    another kernel version serves (checked on 6.18 with 6.1 headers).
if [ "$need_headers" = 1 ]; then
  arch_dir=$(printf '%s\n' /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common_dir="${arch_dir%-amd64}-common"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$arch_dir" "/lib/modules/$kver/build"
  ln -sfn "$common_dir" "/lib/modules/$kver/source"
  say "linked $arch_dir as the header tree for $kver"
else
  say "header tree present: /lib/modules/$kver/build"
fi

# 3. tracefs and debugfs (BCC looks for tracepoints under both).
mountpoint -q /sys/kernel/tracing || { mount -t tracefs nodev /sys/kernel/tracing && say "mounted tracefs"; }
mountpoint -q /sys/kernel/debug || { mount -t debugfs none /sys/kernel/debug && say "mounted debugfs"; }

# 4. A venv that sees Debian's bcc (system site-packages), with capwatch.
py=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
  say "creating venv $venv"
  "$py" -m venv --system-site-packages "$venv"
fi
extra=""
[ "$test_deps" = 1 ] && extra="[test]"
stamp="$venv/.capwatch-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing capwatch$extra into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -e ".$extra"
  touch "$stamp"
else
  say "capwatch already installed in $venv"
fi
"$venv/bin/python" -c "import bcc" 2>/dev/null || { echo "host-setup: bcc is not importable from $venv" >&2; exit 1; }
say "ready"
