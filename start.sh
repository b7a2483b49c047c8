#!/usr/bin/env bash
# One command on a fresh Debian 12 machine (as root): install what is missing, build the default
# template (cached after the first time), and serve the API on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
exec node bin/hutch.js serve "$@"
