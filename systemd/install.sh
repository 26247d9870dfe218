#!/usr/bin/env bash
# Install etcd-defragd from a built checkout as a systemd service.
#
#   sudo ./systemd/install.sh [--prefix DIR] [--node PATH]   install or upgrade
#   sudo ./systemd/install.sh --rollback                     swap back to the previous version
#   sudo ./systemd/install.sh --uninstall [--purge]          remove (--purge also removes /etc/etcd-defragd)
#   (--rollback/--uninstall need the --prefix used to install; the installed copy
#    PREFIX/lib/etcd-defragd/systemd/install.sh does them without a checkout)
#
# Build first, as your own user: `npm ci && npm run build`. This script does not build: run as
# root, npm would leave root-owned files in your checkout and run package scripts as root.
# The production dependencies are the checkout's node_modules pruned with `npm prune --omit=dev`
# (offline, so a control-plane node needs no registry access).
#
# Layout (PREFIX=/usr/local): PREFIX/lib/etcd-defragd (code; the previous version is kept as
# PREFIX/lib/etcd-defragd.prev), PREFIX/bin/etcd-defragd (symlink to the CLI),
# /etc/systemd/system/etcd-defragd.service, /etc/etcd-defragd/config.yaml (never overwritten).
# DESTDIR=/some/root installs under that root and never calls systemctl (for packaging and tests).
set -euo pipefail
umask 022

name=etcd-defragd
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
destdir=${DESTDIR:-}
destdir=${destdir%/}
prefix=/usr/local
node=
action=install
purge=0

usage() {
  sed -n '2,8s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}
say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --node) [[ $# -ge 2 ]] || die "--node needs the path of the node binary"; node=$2; shift 2 ;;
    --node=*) node=${1#*=}; shift ;;
    --uninstall) action=uninstall; shift ;;
    --purge) action=uninstall; purge=1; shift ;;
    --rollback) action=rollback; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ $prefix == /* ]] || die "--prefix must be an absolute path, got '$prefix'"
prefix=${prefix%/}

libdir=$prefix/lib/$name            # paths as seen on the installed system
bindir=$prefix/bin
unitdir=/etc/systemd/system
confdir=/etc/$name
unit=$name.service
r_lib=$destdir$libdir                # the same paths under DESTDIR
r_prev=$r_lib.prev
r_bin=$destdir$bindir/$name
r_unit=$destdir$unitdir/$unit
r_dropins=$destdir$unitdir/$unit.d
r_conf=$destdir$confdir

if [[ -z $destdir && $EUID -ne 0 ]]; then
  die "run as root (sudo $0 ...), or set DESTDIR to install under another root"
fi

# systemctl only for the real system, and only when systemd is the running init.
systemd_running() { [[ -z $destdir && -d /run/systemd/system ]]; }

# The unit installed from DIR/systemd, with the node binary and prefix of this machine.
install_unit() {
  local from=$1/systemd/$unit tmp
  [[ -f $from ]] || die "$from is missing"
  mkdir -p "$(dirname "$r_unit")"
  tmp=$(mktemp "$r_unit.XXXXXX")
  # ExecStart=/usr/bin/node [node flags] /usr/local/lib/NAME/dist/cli.js ...: swap node and prefix, keep the flags.
  sed -e "/^ExecStart=/{s|^ExecStart=/usr/bin/node |ExecStart=$node |;s| /usr/local/lib/$name/| $libdir/|;}" "$from" > "$tmp"
  grep -Eq "^ExecStart=$node( --[a-z-]+)* $libdir/dist/cli.js " "$tmp" || { rm -f "$tmp"; die "could not set ExecStart in $from"; }
  chmod 0644 "$tmp"
  mv -f "$tmp" "$r_unit"
  say "unit:    $r_unit (ExecStart=$node $libdir/dist/cli.js ...)"
}

daemon_reload() {
  if systemd_running; then
    systemctl daemon-reload
  elif [[ -z $destdir ]]; then
    say "systemd is not running here: skipped 'systemctl daemon-reload'"
  fi
}

restart_hint() {
  if systemd_running && systemctl is-active --quiet "$unit"; then
    say ""
    say "$unit is running the old code. Restart it when convenient (a running defrag is allowed to finish):"
    say "  systemctl restart $unit"
  fi
}

find_node() {
  if [[ -z $node ]]; then
    node=$(command -v node) || die "node not found in PATH ($PATH); install Node >= 20.9 or pass --node /path/to/node"
  fi
  [[ $node == /* ]] || die "--node must be an absolute path, got '$node'"
  [[ -x $node ]] || die "$node is not an executable"
  if [[ -z $destdir ]]; then
    case $node in
      /home/*|/root/*|/run/user/*|/tmp/*|/var/tmp/*)
        die "$node is hidden from the service (ProtectHome=yes, PrivateTmp=yes); install Node system-wide (e.g. /usr/bin/node) or pass --node" ;;
    esac
  fi
  local v
  v=$("$node" -p 'process.versions.node' 2>/dev/null) || die "could not run $node"
  local major=${v%%.*} minor=${v#*.}
  minor=${minor%%.*}
  if (( major < 20 || (major == 20 && minor < 9) )); then
    die "$node is Node $v; etcd-defragd needs Node >= 20.9"
  fi
}

do_install() {
  local f
  for f in dist/cli.js node_modules package.json package-lock.json "config/$name.yaml" "systemd/$unit"; do
    [[ -e $src/$f ]] || die "$src/$f not found: build first, as your user: (cd $src && npm ci && npm run build)"
  done
  command -v npm >/dev/null || die "npm not found in PATH; it is needed to prune dev dependencies"
  find_node

  # Stage beside the target so the final rename stays on one file system.
  mkdir -p "$(dirname "$r_lib")"
  stage=$(mktemp -d "$r_lib.new.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  say "staging $stage"
  # Not cp -a: the files must belong to root, not to whoever owns the checkout. Timestamps are
  # kept so npm trusts node_modules/.package-lock.json.
  cp -R --preserve=mode,timestamps "$src/dist" "$src/config" "$src/systemd" "$src/package.json" "$src/package-lock.json" "$src/node_modules" "$stage/"
  (cd "$stage" && npm prune --omit=dev --offline --ignore-scripts --no-audit --no-fund --no-update-notifier --loglevel=error >/dev/null) \
    || die "npm prune --omit=dev failed in $stage (is $src/node_modules from 'npm ci' of this package-lock.json?)"
  chmod -R u+rwX,go+rX,go-w "$stage"
  find "$stage/node_modules" -mindepth 1 -maxdepth 1 -type d -empty -delete   # scopes emptied by prune
  chmod 0755 "$stage" "$stage/dist/cli.js"

  # Keep exactly one previous version; the swap is two renames.
  if [[ -d $r_lib ]]; then
    rm -rf "$r_prev"
    mv "$r_lib" "$r_prev"
    say "kept previous version as $r_prev (roll back with: $libdir/systemd/install.sh --rollback)"
  fi
  mv "$stage" "$r_lib"
  trap - EXIT
  say "code:    $r_lib (version $("$node" -p 'require(process.argv[1]).version' "$r_lib/package.json" 2>/dev/null || echo '?'))"

  mkdir -p "$(dirname "$r_bin")"
  ln -sfn "../lib/$name/dist/cli.js" "$r_bin"
  say "command: $r_bin -> ../lib/$name/dist/cli.js"

  install_unit "$r_lib"

  # Never overwrite an operator's config.
  local shipped=$r_lib/config/$name.yaml
  mkdir -p "$r_conf"
  chmod 0755 "$r_conf"
  if [[ ! -e $r_conf/config.yaml ]]; then
    install -m 0644 "$shipped" "$r_conf/config.yaml"
    say "config:  $r_conf/config.yaml (new, from the shipped default)"
  elif cmp -s "$shipped" "$r_conf/config.yaml"; then
    say "config:  $r_conf/config.yaml (unchanged, same as shipped)"
  else
    install -m 0644 "$shipped" "$r_conf/config.yaml.dist"
    say "config:  $r_conf/config.yaml differs from the shipped default and was left as is;"
    say "         the shipped default is in $r_conf/config.yaml.dist - compare: diff -u $confdir/config.yaml $confdir/config.yaml.dist"
  fi

  daemon_reload
  say ""
  say "Next steps:"
  say "  1. edit $confdir/config.yaml"
  say "  2. $bindir/$name check-config"
  say "  3. systemctl enable --now $unit"
  say "  logs: journalctl -u $unit -f"
  restart_hint
}

do_rollback() {
  [[ -d $r_prev ]] || die "no previous version at $r_prev"
  [[ -d $r_lib ]] || die "no current version at $r_lib"
  find_node
  local tmp=$r_lib.rollback.$$
  mv "$r_lib" "$tmp"
  mv "$r_prev" "$r_lib"
  mv "$tmp" "$r_prev"
  say "code:    $r_lib is the previous version again; the one rolled back from is $r_prev"
  install_unit "$r_lib"
  daemon_reload
  restart_hint
}

do_uninstall() {
  if systemd_running && systemctl cat "$unit" >/dev/null 2>&1; then
    say "stopping and disabling $unit (may wait for a running defrag to finish)"
    systemctl disable --now "$unit" || say "warning: 'systemctl disable --now $unit' failed; continuing"
  fi
  local p removed=()
  for p in "$r_unit" "$r_bin" "$r_lib" "$r_prev" "$r_lib".new.* "$r_lib".rollback.*; do
    [[ $p == "$r_bin" && ! -L $p ]] && continue   # only our symlink, never someone else's file
    if [[ -e $p || -L $p ]]; then rm -rf "$p"; removed+=("$p"); fi
  done
  if (( ${#removed[@]} )); then say "removed: ${removed[*]}"; else say "not installed under $destdir$prefix (nothing to remove)"; fi
  if (( purge )); then
    rm -rf "$r_conf" "$r_dropins"
    say "purged:  $r_conf $r_dropins"
  else
    local kept=$r_conf
    [[ -d $r_dropins ]] && kept="$kept and $r_dropins"
    [[ -d $r_conf || -d $r_dropins ]] && say "kept:    $kept (remove with --purge)"
  fi
  daemon_reload
}

case $action in
  install) do_install ;;
  rollback) do_rollback ;;
  uninstall) do_uninstall ;;
esac
