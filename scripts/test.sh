#!/usr/bin/env bash
# README's test command: install what is needed, check types and lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== typecheck and build"; bash scripts/build.sh
echo "== lint"; npx eslint . && npx prettier --check . >/dev/null
echo "== tests"
# every multi-host partition scenario, not only the quick set
export CORRAL_MULTIHOST_ALL="${CORRAL_MULTIHOST_ALL:-1}"
node scripts/run-tests.mjs "$@"
