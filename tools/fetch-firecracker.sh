#!/usr/bin/env bash
# Installs Firecracker and its jailer for hearth's firecracker backend.
#
# Usage: tools/fetch-firecracker.sh [--version vX.Y.Z|latest] [--from DIR | --shared] [--force] [DEST]
#   (default)      the official release for this machine's architecture from
#                  github.com/firecracker-microvm/firecracker, checked against
#                  the release's sha256 file; version v1.16.1 (the one hearth is
#                  tested with) unless --version says otherwise.
#   --from DIR     copy DIR/firecracker and DIR/jailer instead (no network).
#   --shared       --from the first of <checkout>/../shared/firecracker and
#                  <checkout>/../../shared/firecracker (how CI here installs them).
#   DEST           where to put them: $HEARTH_FIRECRACKER_DIR, else
#                  /var/cache/hearth/firecracker (hearth looks there after
#                  $HEARTH_FIRECRACKER / $HEARTH_JAILER and PATH).
# Prints the installed firecracker path; `hearth doctor` reports what it found.
set -euo pipefail
version=v1.16.1
from=
force=0
dest=${HEARTH_FIRECRACKER_DIR:-/var/cache/hearth/firecracker}
root=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version="$2"; shift ;;
    --from) from="$2"; shift ;;
    --shared)
      for d in "$root/../shared/firecracker" "$root/../../shared/firecracker"; do
        if [ -x "$d/firecracker" ]; then from=$(cd "$d" && pwd); break; fi
      done
      [ -n "$from" ] || { echo "fetch-firecracker: no shared/firecracker next to $root or its parent" >&2; exit 1; } ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "fetch-firecracker: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) dest="$1" ;;
  esac
  shift
done

installed_version() { [ -x "$dest/firecracker" ] && "$dest/firecracker" --version 2>/dev/null | head -n1 | awk '{print $2}'; }

if [ -z "$from" ] && [ "$force" = 0 ] && [ "$version" != latest ] && [ "$(installed_version || true)" = "$version" ] \
   && [ -x "$dest/jailer" ]; then
  echo "$dest/firecracker"
  exit 0
fi

mkdir -p "$dest"
work=$(mktemp -d "$dest/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ -n "$from" ]; then
  for b in firecracker jailer; do
    [ -x "$from/$b" ] || { echo "fetch-firecracker: $from/$b is missing or not executable" >&2; exit 1; }
    cp "$from/$b" "$work/$b"
  done
else
  arch=$(uname -m)
  case "$arch" in x86_64|aarch64) ;; *) echo "fetch-firecracker: no Firecracker release for $arch" >&2; exit 1 ;; esac
  base=https://github.com/firecracker-microvm/firecracker/releases
  if [ "$version" = latest ]; then
    # The "latest" page redirects to .../tag/vX.Y.Z.
    version=$(curl -fsSLI -o /dev/null -w '%{url_effective}' "$base/latest" | sed 's#.*/tag/##')
    case "$version" in v[0-9]*) ;; *) echo "fetch-firecracker: cannot tell the latest release ($version)" >&2; exit 1 ;; esac
  fi
  tgz="firecracker-$version-$arch.tgz"
  echo "fetch-firecracker: downloading $base/download/$version/$tgz" >&2
  curl -fsSL -o "$work/$tgz" "$base/download/$version/$tgz"
  curl -fsSL -o "$work/$tgz.sha256.txt" "$base/download/$version/$tgz.sha256.txt"
  (cd "$work" && sha256sum -c --quiet "$tgz.sha256.txt") \
    || { echo "fetch-firecracker: $tgz does not match its sha256 file" >&2; exit 1; }
  tar -xzf "$work/$tgz" -C "$work"
  rel="$work/release-$version-$arch"
  mv "$rel/firecracker-$version-$arch" "$work/firecracker"
  mv "$rel/jailer-$version-$arch" "$work/jailer"
  for f in LICENSE NOTICE THIRD-PARTY; do [ -f "$rel/$f" ] && cp "$rel/$f" "$dest/$f"; done
fi

chmod 0755 "$work/firecracker" "$work/jailer"
got=$("$work/firecracker" --version 2>/dev/null | head -n1 || true)
case "$got" in Firecracker\ v*) ;; *) echo "fetch-firecracker: the firecracker binary does not run here (--version said: ${got:-nothing})" >&2; exit 1 ;; esac
"$work/jailer" --version >/dev/null 2>&1 || { echo "fetch-firecracker: the jailer binary does not run here" >&2; exit 1; }
# Replaced by rename: a running VMM keeps its old binary.
mv -f "$work/firecracker" "$dest/firecracker"
mv -f "$work/jailer" "$dest/jailer"
echo "fetch-firecracker: $got -> $dest" >&2
echo "$dest/firecracker"
