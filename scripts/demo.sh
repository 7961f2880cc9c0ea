#!/usr/bin/env bash
# README's demo command: install what is needed, build, and run `corral demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
bash scripts/build.sh
exec node bin/corral.js demo "$@"
