#!/usr/bin/env bash
# Build, offline from any container registry, a root filesystem equivalent to
# the image deploy/Containerfile defines: Debian 12 (debootstrap), Debian's
# bcc, a shipped kernel header tree, and capwatch from this repository in a
# venv that sees Debian's bcc. Run it with podman as
#
#   podman run --rootfs DIR capwatch serve ...      (or: tar -C DIR -c . | podman import - capwatch)
#
#   deploy/build-rootfs.sh DIR [--mirror URL] [--security-mirror URL] [--force]
#
# Two cached stages, each with a stamp inside DIR/usr/share/capwatch-rootfs/:
#   base  debootstrap + packages + header tree (minutes). Rebuilt when the
#         stage-1 part of this script or the mirror changes.
#   app   capwatch installed into /opt/capwatch, the entrypoint (seconds).
#         Rebuilt when the base, stage 2 of this script, pyproject.toml,
#         README.md, capwatch/, bpf/ or deploy/entrypoint.sh change.
# A second run with nothing changed does nothing. Concurrent runs for the same
# DIR wait for each other (flock on DIR.lock).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
script="$here/$(basename "${BASH_SOURCE[0]}")"
suite=bookworm

say() { printf 'build-rootfs: %s\n' "$*"; }
die() { printf 'build-rootfs: %s\n' "$*" >&2; exit 1; }

# The first Debian (non-security) and security mirrors apt is configured with,
# from one-line (sources.list) or deb822 (*.sources) files.
apt_uri() {  # $1: "main" or "security"
  local f line uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    while IFS= read -r line; do
      case "$line" in
        deb\ *) uri=$(printf '%s\n' "$line" | sed -E 's/^deb +(\[[^]]*\] +)?([^ ]+).*/\2/') ;;
        URIs:*) uri=$(printf '%s\n' "$line" | awk '{print $2}') ;;
        *) continue ;;
      esac
      case "$uri" in
        *debian-security*) [ "$1" = security ] && { echo "$uri"; return; } ;;
        */debian|*/debian/) [ "$1" = main ] && { echo "${uri%/}"; return; } ;;
      esac
    done <"$f"
  done
}

dir=""
mirror="${CAPWATCH_DEBIAN_MIRROR:-}"
sec_mirror="${CAPWATCH_DEBIAN_SECURITY_MIRROR:-}"
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) mirror="$2"; shift 2 ;;
    --security-mirror) sec_mirror="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,18p' "$script"; exit 0 ;;
    -*) die "unknown option: $1" ;;
    *) [ -z "$dir" ] || die "one DIR only"; dir="$1"; shift ;;
  esac
done
[ -n "$dir" ] || die "usage: build-rootfs.sh DIR [--mirror URL] [--force]"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
mirror="${mirror:-$(apt_uri main)}"
mirror="${mirror:-http://deb.debian.org/debian}"
sec_mirror="${sec_mirror:-$(apt_uri security)}"
sec_mirror="${sec_mirror:-http://deb.debian.org/debian-security}"

dir=$(realpath -m "$dir")
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

stamps="usr/share/capwatch-rootfs"
# The base key covers the stage-1 text only, so editing stage 2 keeps the base.
base_key=$( { sed -n '/^# --- stage 1/,/^# --- stage 2/p' "$script"; echo "$suite $mirror $sec_mirror"; } \
  | sha256sum | cut -c1-64)
# Everything pip packages from the repo (symlinks as links, not followed).
srcs=()
for f in pyproject.toml README.md capwatch bpf deploy/entrypoint.sh; do if [ -e "$repo/$f" ]; then srcs+=("$f"); fi; done
app_key=$( {
  cd "$repo"
  echo "$base_key"
  sed -n '/^# --- stage 2/,$p' "$script"
  find "${srcs[@]}" \( -name __pycache__ -o -name '*.egg-info' \) -prune \
    -o \( -type f -o -type l \) -print 2>/dev/null | LC_ALL=C sort | while IFS= read -r f; do
      if [ -L "$f" ]; then echo "$f -> $(readlink "$f")"; else echo "$f $(sha256sum <"$f" | cut -c1-64)"; fi
    done
} | sha256sum | cut -c1-64)

# --- stage 1: base system -----------------------------------------------------
if [ "$force" = 0 ] && [ "$(cat "$dir/$stamps/base" 2>/dev/null)" = "$base_key" ]; then
  say "base up to date ($dir)"
else
  t0=$(date +%s)
  part="$dir.partial"
  rm -rf "$part"
  say "debootstrap $suite from $mirror into $part"
  # python3-bpfcc: Debian's bcc (the PyPI "bcc" is an unrelated project).
  # python3-numpy: capwatch's batch decoder; Debian's 1.24 satisfies >=1.24.
  # python3-cap-ng: libcap-ng's bindings, serve's privilege drop after attach.
  debootstrap --variant=minbase --include=python3-bpfcc,python3-venv,python3-numpy,python3-cap-ng \
    "$suite" "$part" "$mirror" >"$dir.debootstrap.log" 2>&1 \
    || { tail -n 20 "$dir.debootstrap.log" >&2; die "debootstrap failed (log: $dir.debootstrap.log)"; }
  cat >"$part/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $sec_mirror $suite-security main
EOF
  in_root() { chroot "$part" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
  in_root apt-get update -qq
  in_root apt-get -y -qq -o Dpkg::Use-Pty=0 upgrade >/dev/null
  # The shipped header tree: Debian's linux-headers-amd64 resolves to a split
  # pair (linux-headers-X-amd64 + linux-headers-X-common). Unpack the two
  # packages only: their Depends (gcc, kbuild) build modules, BCC needs none
  # of it, and a compiler has no place in a privileged container.
  arch_pkg=$(in_root apt-cache depends linux-headers-amd64 | awk '/Depends: linux-headers-/{print $2; exit}')
  [ -n "$arch_pkg" ] || die "cannot resolve linux-headers-amd64 in $suite"
  common_pkg=$(in_root apt-cache depends "$arch_pkg" | awk '/Depends: linux-headers-.*-common/{print $2; exit}')
  [ -n "$common_pkg" ] || die "cannot resolve the -common package of $arch_pkg"
  mkdir -p "$part/tmp/debs"
  chmod 777 "$part/tmp/debs"  # apt downloads as _apt
  in_root sh -c "cd /tmp/debs && apt-get download -qq $arch_pkg $common_pkg"
  # --keep-directory-symlink: the packages carry ./lib/modules, and /lib is a
  # symlink to usr/lib on Debian 12 (merged /usr); plain extraction (as
  # dpkg-deb -x does) would replace it with a directory and lose the loader.
  for deb in "$part"/tmp/debs/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$part" -x --keep-directory-symlink
  done
  say "shipped header tree: $arch_pkg + $common_pkg"
  # Trim: apt lists and caches are rebuilt by apt-get update when needed.
  in_root apt-get clean
  rm -rf "$part/tmp/debs" "$part"/var/lib/apt/lists/* "$part"/var/cache/apt/*.bin \
    "$part"/var/log/*.log "$part"/var/log/apt/*
  # capwatch's writable state (merged header farm): tmpfs/emptyDir at run time.
  mkdir -p "$part/run/capwatch" "$part/$stamps"
  printf '%s\n%s\n' "$arch_pkg" "$common_pkg" >"$part/$stamps/headers"
  echo "$base_key" >"$part/$stamps/base"
  rm -rf "$dir"
  mv "$part" "$dir"
  say "base built in $(( $(date +%s) - t0 )) s"
fi

# --- stage 2: capwatch ------------------------------------------------------
if [ "$force" = 0 ] && [ "$(cat "$dir/$stamps/app" 2>/dev/null)" = "$app_key" ]; then
  say "capwatch up to date ($dir)"
  exit 0
fi
t0=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Wheels are built on the host with the host's pip configuration (index,
# certificates, proxy), then installed in the rootfs with no network. The
# source is copied first so the build leaves nothing in the repository.
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' --exclude=deploy -cf - \
  "${srcs[@]}" | tar -C "$work" -xf - --one-top-level=src
py="${PYTHON:-python3}"
"$py" -m pip --version >/dev/null 2>&1 || py="$repo/.venv/bin/python"
"$py" -m pip wheel -q --disable-pip-version-check -w "$work/wheels" "$work/src" \
  || die "building the capwatch wheel failed"
rm -rf "$dir/opt/capwatch" "$dir/tmp/wheels"
cp -r "$work/wheels" "$dir/tmp/wheels"
in_root() { chroot "$dir" env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"; }
in_root python3 -m venv --system-site-packages /opt/capwatch
in_root /opt/capwatch/bin/pip install -q --no-index --find-links /tmp/wheels \
  --disable-pip-version-check --no-warn-script-location capwatch
rm -rf "$dir/tmp/wheels"
ln -sfn /opt/capwatch/bin/capwatch "$dir/usr/local/bin/capwatch"
install -m 0755 "$repo/deploy/entrypoint.sh" "$dir/usr/local/bin/capwatch-entrypoint"
in_root /opt/capwatch/bin/python -c 'import bcc, capwatch.kernel.bpf as b; b.bpf_source_dir()' \
  || die "the rootfs cannot import bcc or find the BPF source (package data: capwatch/bpf_src)"
version=$(in_root capwatch --version)
echo "$app_key" >"$dir/$stamps/app"
say "installed $version in $(( $(date +%s) - t0 )) s"
