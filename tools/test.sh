#!/usr/bin/env bash
# The test command: installs and builds what the tests need, then runs them all:
# the Node runtime shim's tests and every cargo test (unit, integration, real
# sandboxes, real QEMU microVMs under software emulation).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh debug
# Lints and formatting are part of the test: [workspace.lints] in Cargo.toml.
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  cargo fmt --all --check
  cargo clippy -q --all-targets --workspace -- -D warnings
else
  echo "test: rustfmt/clippy are not installed (rustup component add rustfmt clippy); lint step skipped"
fi
tools/fetch-kernel.sh >/dev/null 2>&1 || echo "test: guest kernel unavailable; QEMU tests will say why they skip"
node --test tests/runtime/
cargo test --workspace -- --test-threads 2
