#!/usr/bin/env bash
# Fetch etcd server and client binaries from Debian packages and cache them.
#   scripts/fetch-etcd.sh 3.4|3.5 [...]   -> prints the cache dir of each (DIR/etcd, DIR/etcdctl)
# 3.4 comes from bookworm, 3.5 from sid (trixie has 3.5.16; sid is what Kubernetes runs today).
# The packages are downloaded and unpacked, never installed: nothing is started, apt sources are untouched.
set -euo pipefail

cache=${ETCD_DEFRAGD_ETCD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/etcd-defragd/etcd}
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
uri=${uri:-http://deb.debian.org/debian}
# Debian's archive key signs the lists; Ubuntu does not have it by default (package
# debian-archive-keyring, in Ubuntu's universe).
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

fetch() {
  local version=$1 suite
  case $version in
    3.4) suite=bookworm ;;
    3.5) suite=sid ;;
    *) echo "fetch-etcd: unknown etcd version '$version' (accepted: 3.4, 3.5)" >&2; return 64 ;;
  esac
  local dest=$cache/$version
  # The stamp is written last, after both binaries are in place: its presence means a complete fetch.
  if [[ -x $dest/etcd && -x $dest/etcdctl && -f $dest/.fetched ]]; then
    echo "$dest"; return 0
  fi
  if [[ ! -f $keyring ]]; then
    echo "fetch-etcd: $keyring missing (not Debian?): installing debian-archive-keyring" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debian-archive-keyring; } >&2 ||
      { echo "fetch-etcd: could not install debian-archive-keyring; install it (apt-get install debian-archive-keyring) and retry" >&2; return 1; }
  fi
  local t; t=$(mktemp -d)
  trap 'rm -rf "$t"' RETURN
  mkdir -p "$t/lists/partial" "$t/archives/partial" "$t/root"
  echo "deb [signed-by=$keyring] $uri $suite main" > "$t/sources.list"
  local o=(-o "Dir::Etc::SourceList=$t/sources.list" -o Dir::Etc::SourceParts=/dev/null
           -o "Dir::State::Lists=$t/lists" -o "Dir::Cache::Archives=$t/archives" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${o[@]}" -qq update >&2
  (cd "$t" && apt-get "${o[@]}" -qq download etcd-server etcd-client >&2)
  for deb in "$t"/etcd-server_*.deb "$t"/etcd-client_*.deb; do dpkg -x "$deb" "$t/root"; done
  mkdir -p "$dest"
  # Rename into place: overwriting a binary that a running etcd executes fails (text file busy).
  for b in etcd etcdctl; do
    install -m 0755 "$t/root/usr/bin/$b" "$dest/.$b.new"
    mv -f "$dest/.$b.new" "$dest/$b"
  done
  env -i "$dest/etcd" --version | head -1 > "$dest/.fetched"
  cat "$dest/.fetched" >&2
  echo "$dest"
}

[[ $# -gt 0 ]] || set -- 3.4 3.5
for v in "$@"; do fetch "$v"; done
