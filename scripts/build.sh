#!/usr/bin/env bash
# Compile TypeScript to dist/ and stamp it, so bin/corral.js runs the compiled code
# (fast start-up) until a source file is newer than the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
touch -d '-1 second' dist.stamp.tmp 2>/dev/null || touch dist.stamp.tmp
npx tsc -p tsconfig.json
mv dist.stamp.tmp dist/.stamp
