#!/bin/sh
# capwatch's container entrypoint.
#
#   (no arguments)            -> capwatch serve
#   --listen ... (options)    -> capwatch serve --listen ...
#   decode 0x... (a command)  -> capwatch decode 0x...
#   --version                 -> capwatch --version
#
# Kernel headers. The DaemonSet mounts the host's /lib/modules and /usr/src
# under /host, not over the image's own paths: mounted on /usr/src, the host's
# directory (which exists, often empty, on nodes without headers) would hide the
# tree shipped in the image, the fallback for exactly those nodes. The host's
# /lib/modules/<release>/build is a symlink that is absolute on the host
# (/usr/src/linux-headers-...), so it is followed here under /host, and a
# usable tree is passed to capwatch as $CAPWATCH_KERNEL_HEADERS. Without one,
# capwatch falls back to the image's /usr/src tree and logs which it used.
# A $CAPWATCH_KERNEL_HEADERS set by the user wins.
set -eu

host="${CAPWATCH_HOST_ROOT:-/host}"
release="${CAPWATCH_KERNEL_RELEASE:-$(uname -r)}"

# Print $host + the host path $1 with its symlinks followed the way the host
# would follow them (absolute targets are re-rooted under $host).
host_realpath() {
  p="$1"
  n=0
  while [ -L "$host$p" ] && [ "$n" -lt 16 ]; do
    t=$(readlink "$host$p")
    case "$t" in
      /*) p="$t" ;;
      *) p="$(dirname "$p")/$t" ;;
    esac
    n=$((n + 1))
  done
  printf '%s%s\n' "$host" "$p"
}

full_tree() { [ -e "$1/include/linux/kconfig.h" ]; }

if [ -z "${CAPWATCH_KERNEL_HEADERS:-}" ] && [ -d "$host/lib/modules/$release" ]; then
  build=$(host_realpath "/lib/modules/$release/build")
  if [ -d "$build" ]; then
    # A whole tree, or a Debian split pair (<X>-amd64 + <X>-common siblings),
    # which capwatch merges itself.
    case "$build" in
      *-amd64 | *-arm64) common="${build%-*}-common" ;;
      *) common="" ;;
    esac
    if full_tree "$build" || { [ -n "$common" ] && full_tree "$common"; }; then
      export CAPWATCH_KERNEL_HEADERS="$build"
    fi
  fi
fi

bin="${CAPWATCH_BIN:-capwatch}"
case "${1:-}" in
  --version) exec "$bin" --version ;;
  "" | -*) exec "$bin" serve "$@" ;;
  *) exec "$bin" "$@" ;;
esac
