#!/usr/bin/env bash
# Assembles the nested-KVM test host ("L1"): a Linux guest that QEMU runs
# under software emulation with AMD SVM and nested paging, so that its
# /dev/kvm can run hearth's microVMs (QEMU -accel kvm, Firecracker) here,
# where the host's own KVM cannot. Used by tests/nested_kvm.rs.
#
# Usage: tools/nested/build-l1.sh OUT HEARTH AGENT
#   OUT     output directory (rebuilt only when an input changed)
#   HEARTH  the hearth binary to run in L1
#   AGENT   the static guest agent (target/x86_64-unknown-linux-gnu/release/hearth-agent)
# Writes:
#   OUT/vmlinuz      L1's kernel (Debian's cloud kernel, tools/fetch-kernel.sh)
#   OUT/initrd.cpio  busybox and the modules that find the root disk and /dev/kvm
#   OUT/root.ext4    L1's root: busybox, bash, e2fsprogs, Node.js, Python 3, QEMU and its
#                    firmware, hearth, the agent, the guest kernel tree and,
#                    Firecracker when tools/fetch-firecracker.sh installed it; run with QEMU's snapshot=on so
#                    L1's writes never reach the file
# Needs busybox-static, e2fsprogs, cpio, and the kernel from tools/fetch-kernel.sh.
set -euo pipefail
[ $# -eq 3 ] || { sed -n '2,19p' "$0"; exit 2; }
out=$1 hearth=$(readlink -f "$2") agent=$(readlink -f "$3")
here=$(cd "$(dirname "$0")" && pwd)
kdir=${HEARTH_KERNEL_DIR:-/var/cache/hearth/kernel}/current
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$vmlinuz" ] || { echo "build-l1: no kernel in $kdir: run tools/fetch-kernel.sh" >&2; exit 1; }
rel=${vmlinuz##*/vmlinuz-}
mods=$(readlink -f "$kdir")/lib/modules/$rel/kernel
busybox=/bin/busybox
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "build-l1: no static $busybox: apt-get install busybox-static" >&2; exit 1
fi
# Firecracker and its jailer where tools/fetch-firecracker.sh installs them;
# L1 gets them at the same path, where hearth looks.
fcdir=${HEARTH_FIRECRACKER_DIR:-/var/cache/hearth/firecracker}
if [ ! -x "$fcdir/firecracker" ] && [ -x "$here/../fetch-firecracker.sh" ]; then
  # No network needed: the binaries next to the checkout (../shared/firecracker).
  "$here/../fetch-firecracker.sh" --shared "$fcdir" >/dev/null 2>&1 \
    || echo "build-l1: no Firecracker installed (tools/fetch-firecracker.sh); L1 gets none" >&2
fi
fc_bins=()
for b in "$fcdir/firecracker" "$fcdir/jailer"; do [ -x "$b" ] && fc_bins+=("$b"); done

py=$(readlink -f /usr/bin/python3 2>/dev/null || true)
[ -x "$py" ] || { py=; echo "build-l1: no /usr/bin/python3: L1 runs no python3 functions" >&2; }

# Inputs that decide the output; anything else changing needs a manual `rm -r OUT`.
inputs=("$0" "$here/l1-init" "$hearth" "$agent" "$vmlinuz" "$busybox" /usr/bin/node
        /usr/bin/qemu-system-x86_64 "${fc_bins[@]}" ${py:+"$py"})
stamp=$(stat -L -c '%n %s %Y' "${inputs[@]}" | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/root.ext4" ]; then
  exit 0
fi
mkdir -p "$out"
rm -f "$out/stamp"
work=$(mktemp -d "$out/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- initramfs: mount the root disk and switch to it ---
ird=$work/initrd
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,modules}
cp "$busybox" "$ird/bin/busybox"
order="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
       failover net_failover virtio_net irqbypass kvm kvm-amd"
for m in $order; do
  f=$(find "$mods" -name "$m.ko" | head -n1)
  [ -n "$f" ] || { echo "build-l1: module $m.ko missing under $mods" >&2; exit 1; }
  cp "$f" "$ird/modules/"
  echo "$m" >> "$ird/modules/order"
done
cat > "$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "l1: insmod $m failed"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /newroot || { echo "l1: cannot mount the root disk"; poweroff -f; }
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/l1-init
INIT
chmod 755 "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet) > "$work/initrd.cpio"

# --- root disk ---
r=$work/root
mkdir -p "$r"/usr/{bin,sbin,lib,lib64,share} "$r"/{dev,proc,sys,tmp,run,etc,opt/hearth,state,root}
for l in bin sbin lib lib64; do ln -s usr/$l "$r/$l"; done
chmod 1777 "$r/tmp"
# A program and the libraries ldd names, at the same paths (merged /usr).
copy_with_libs() {
  local src=$1 dest=${2:-$1}
  mkdir -p "$r$(dirname "$dest")"
  cp -L "$src" "$r$dest"
  { ldd "$src" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
    local real=${lib#/usr}; real=/usr$real
    [ -e "$r$real" ] || { mkdir -p "$r$(dirname "$real")"; cp -L "$lib" "$r$real"; }
  done
}
for b in /usr/bin/bash /usr/bin/ldd /usr/sbin/mkfs.ext4 /usr/sbin/e2fsck /usr/sbin/debugfs /usr/bin/node \
         /usr/bin/qemu-system-x86_64; do
  copy_with_libs "$b"
done
for b in "${fc_bins[@]}"; do copy_with_libs "$b" "/var/cache/hearth/firecracker/${b##*/}"; done
# Python 3 (the interpreter under its versioned name, its standard library and
# what its extension modules link), which hearth copies into the userland
# drive of `provided` and `python3` functions.
if [ -n "$py" ]; then
  copy_with_libs "$py"
  ln -sf "${py##*/}" "$r/usr/bin/python3"
  std=/usr/lib/${py##*/}
  cp -a "$std" "$r$std"
  rm -rf "$r$std"/{test,idlelib,tkinter,turtledemo,ensurepip}
  [ -d "/etc/${py##*/}" ] && cp -a "/etc/${py##*/}" "$r/etc/"
  for so in "$r$std"/lib-dynload/*.so; do copy_with_libs "${so#"$r"}"; done
fi
cp "$busybox" "$r/usr/bin/busybox"
mkdir -p "$r/opt/bb"
for a in $("$busybox" --list); do ln -s /usr/bin/busybox "$r/opt/bb/$a"; done
ln -sf bash "$r/usr/bin/sh"
copy_with_libs "$hearth" /opt/hearth/hearth
cp "$agent" "$r/opt/hearth/hearth-agent"
# QEMU's firmware (BIOS, option ROMs): /usr/share/qemu links into seabios and ipxe.
for d in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
  [ -d "$d" ] && { mkdir -p "$r$(dirname "$d")"; cp -a "$d" "$r$d"; }
done
rm -rf "$r/usr/share/qemu/"{openbios-*,s390-*,skiboot.lid,slof.bin,hppa-firmware.img,opensbi-*,palcode-clipper,u-boot*,edk2-*}
# The guest kernel tree hearth looks for, with only the modules its guests load.
kt=$r/var/cache/hearth/kernel/tree
mkdir -p "$kt/boot" "$kt/lib/modules/$rel/kernel"
cp "$vmlinuz" "$kt/boot/"
[ -f "$kdir/boot/vmlinux-$rel" ] && cp "$kdir/boot/vmlinux-$rel" "$kt/boot/"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk \
         virtio_console virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
  f=$(find "$mods" -name "$m.ko" | head -n1)
  [ -n "$f" ] && cp "$f" "$kt/lib/modules/$rel/kernel/"
done
ln -s tree "$r/var/cache/hearth/kernel/current"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
printf '127.0.0.1\tlocalhost\n' > "$r/etc/hosts"
install -m 755 "$here/l1-init" "$r/sbin/l1-init"
used=$(du -sm "$r" | cut -f1)
# Room for hearth's state (runtime image, snapshots); sparse, written through a
# throwaway overlay (snapshot=on) anyway.
truncate -s $(( used + 3072 ))M "$work/root.ext4"
mkfs.ext4 -q -F -L l1root -d "$r" "$work/root.ext4"
mv "$work/initrd.cpio" "$out/initrd.cpio"
mv "$work/root.ext4" "$out/root.ext4"
cp "$vmlinuz" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "build-l1: $out (root ${used} MiB)" >&2
