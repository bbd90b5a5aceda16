#!/usr/bin/env bash
# Installs what hearth and its tests need on a fresh Debian machine, then builds
# the server and the static guest agent. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in nodejs:node e2fsprogs:mkfs.ext4 lz4:lz4 cpio:cpio qemu-system-x86:qemu-system-x86_64 wrk:wrk nginx-light:nginx linux-perf:perf busybox-static:busybox; do
  command -v "${pkg#*:}" >/dev/null 2>&1 || need+=("${pkg%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The real Lambda clients the service API tests drive (tests/lambda_api.rs).
if ! command -v aws >/dev/null 2>&1 || ! python3 -c 'import boto3' >/dev/null 2>&1; then
  echo "setup: installing awscli and boto3 (pip)"
  python3 -m pip install -q awscli boto3 2>/dev/null \
    || python3 -m pip install -q --break-system-packages awscli boto3 \
    || echo "setup: warning: could not install awscli/boto3; tests/lambda_api.rs will skip"
fi
# The Express fixture's node_modules (tests zip it into functions).
if [ ! -d tests/fixtures/express-app/node_modules ] || [ tests/fixtures/express-app/package-lock.json -nt tests/fixtures/express-app/node_modules ]; then
  (cd tests/fixtures/express-app && npm ci --no-audit --no-fund --loglevel=error)
fi
profile=${1:-release}
if [ "$profile" = release ]; then cargo build --release -q; else cargo build -q; fi
tools/build-agent.sh release >/dev/null
echo "setup: ok"
