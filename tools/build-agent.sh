#!/usr/bin/env bash
# Builds the guest agent as a fully static binary (it runs as PID 1 in process
# sandboxes and inside microVM initramfs images, where no shared libraries exist).
# Output: target/x86_64-unknown-linux-gnu/<profile>/hearth-agent
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
flags=(-p hearth-agent --target x86_64-unknown-linux-gnu)
[ "$profile" = release ] && flags+=(--release)
# An explicit --target keeps these flags away from build scripts and proc-macros.
RUSTFLAGS="-C target-feature=+crt-static -C force-frame-pointers=yes" cargo build -q "${flags[@]}"
echo "target/x86_64-unknown-linux-gnu/$profile/hearth-agent"
