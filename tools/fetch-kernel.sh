#!/usr/bin/env bash
# Fetches the guest kernel of hearth's microVM backends: Debian's
# linux-image-cloud-amd64, downloaded with `apt-get download` and unpacked
# with `dpkg-deb -x` (nothing is installed on the host).
#
# Usage: tools/fetch-kernel.sh [--force] [DIR | --state-dir STATE]
#   DIR defaults to $HEARTH_KERNEL_DIR, else /var/cache/hearth/kernel (where
#   hearth looks after <state>/cache/kernel); --state-dir STATE uses
#   STATE/cache/kernel.
# Layout: DIR/<package>_<version>/{boot/vmlinuz-<rel>,lib/modules/<rel>/...},
# DIR/current -> that tree, and boot/vmlinux-<rel> (the ELF kernel Firecracker
# boots, cut out of the bzImage's LZ4 payload) when lz4 is installed.
# Prints the vmlinuz path.
set -euo pipefail
force=0
dest=${HEARTH_KERNEL_DIR:-/var/cache/hearth/kernel}
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --state-dir) dest="$2/cache/kernel"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) dest="$1" ;;
  esac
  shift
done
meta=linux-image-cloud-amd64

current_vmlinuz() { ls "$dest"/current/boot/vmlinuz-* 2>/dev/null | head -n1; }

if [ "$force" = 0 ] && [ -n "$(current_vmlinuz)" ]; then
  current_vmlinuz
  exit 0
fi

mkdir -p "$dest"
pkg() { apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'; }
name=$(pkg)
if [ -z "$name" ]; then
  echo "fetch-kernel: $meta unknown to apt; running apt-get update" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  name=$(pkg)
fi
[ -n "$name" ] || { echo "fetch-kernel: apt knows no $meta (is this Debian with main enabled?)" >&2; exit 1; }

work=$(mktemp -d "$dest/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt's sandbox user cannot write here when we are root; that only costs a warning.
(cd "$work" && apt-get download -q "$name" 2>&1 | grep -v 'unsandboxed' >&2 || true)
deb=$(ls "$work"/*.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || { echo "fetch-kernel: apt-get download $name wrote no .deb" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/tree"
tree=$(basename "$deb" .deb)
rm -rf "${dest:?}/$tree"
mv "$work/tree" "$dest/$tree"
ln -sfn "$tree" "$dest/.current.tmp"
mv -T "$dest/.current.tmp" "$dest/current"

vmlinuz=$(current_vmlinuz)
rel=${vmlinuz##*/vmlinuz-}
if command -v lz4 >/dev/null; then
  # x86 boot header: setup_sects at 0x1f1, payload offset/length at 0x248/0x24c;
  # the payload is an LZ4 legacy stream followed by its 4-byte decompressed size.
  u() { od -An -t"u$1" -j "$2" -N "$1" "$vmlinuz" | tr -d ' '; }
  setup_sects=$(u 1 $((0x1f1))); [ "$setup_sects" = 0 ] && setup_sects=4
  start=$(( (setup_sects + 1) * 512 + $(u 4 $((0x248))) ))
  len=$(u 4 $((0x24c)))
  out="$dest/$tree/boot/vmlinux-$rel"
  if dd if="$vmlinuz" bs=64K iflag=skip_bytes,count_bytes skip="$start" count=$((len - 4)) status=none \
       | lz4 -dc > "$out.tmp" 2>/dev/null \
     && [ "$(head -c 4 "$out.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
    mv "$out.tmp" "$out"
  else
    rm -f "$out.tmp"
    echo "fetch-kernel: could not extract vmlinux (only a Firecracker backend would boot it; QEMU boots the bzImage)" >&2
  fi
fi
echo "fetch-kernel: $name -> $dest/$tree" >&2
echo "$vmlinuz"
