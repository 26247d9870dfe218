#!/usr/bin/env bash
# Quick start: a local 3-member etcd cluster (client TLS, Debian's etcd), a fragmented database,
# and etcd-defragd deciding and defragmenting it. Installs what it needs; stops what it started.
#   bash scripts/demo.sh [3.4|3.5]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.5}
command -v openssl >/dev/null || { echo "installing openssl"; apt-get update -qq && apt-get install -y -qq openssl; }
bash scripts/fetch-etcd.sh "$version" >/dev/null
[[ -d node_modules ]] || npm ci --no-audit --no-fund
exec node --import tsx scripts/demo.ts "$version"
