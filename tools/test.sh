#!/usr/bin/env bash
# Set-up plus the whole test suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec python3 -m pytest -q -ra "$@"
