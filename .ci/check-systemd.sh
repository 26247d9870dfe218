#!/usr/bin/env bash
# Checks the systemd packaging: the unit (systemd-analyze verify + security score) and
# systemd/install.sh (install, upgrade, rollback, uninstall, purge under DESTDIR).
#
#   .ci/check-systemd.sh          needs systemd-analyze, node, npm; assumes `npm ci && npm run build` ran
#   .ci/check-systemd.sh --boot   also boots a throwaway systemd container (root + systemd-nspawn from
#                                 the systemd-container package) and runs the installed unit for real
#                                 against a one-member TLS etcd 3.5 (scripts/fetch-etcd.sh)
set -euo pipefail

max_exposure=2.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unit_src=$repo/systemd/etcd-defragd.service
install_sh=$repo/systemd/install.sh
boot=0
[[ ${1:-} == --boot ]] && boot=1

t=$(mktemp -d)
ns=
cleanup() {
  if [[ -n $ns ]] && kill "$ns" 2>/dev/null; then wait "$ns" || true; fi   # a container still up: halt it
  rm -rf "$t"
}
trap cleanup EXIT
fails=0
ok() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; fails=$((fails + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
node=$(command -v node) || { echo "node not found" >&2; exit 1; }

echo "== shellcheck"
if command -v shellcheck >/dev/null; then
  check "shellcheck install.sh check-systemd.sh" shellcheck "$install_sh" "${BASH_SOURCE[0]}"
else
  echo "skip shellcheck: not installed (apt-get install shellcheck)"
fi

echo "== systemd-analyze verify"
# verify also checks that ExecStart's binary exists on *this* machine. The unit ships with
# /usr/bin/node (install.sh rewrites it to the target's node); where CI's node lives elsewhere
# (e.g. setup-node's tool cache) verify a copy pointing at this node instead.
unit=$unit_src
if [[ ! -x /usr/bin/node ]]; then
  mkdir -p "$t/verify"
  unit=$t/verify/etcd-defragd.service
  sed "s|^ExecStart=/usr/bin/node |ExecStart=$node |" "$unit_src" > "$unit"
  echo "(no /usr/bin/node here: verifying a copy with ExecStart=$node)"
fi
if out=$(systemd-analyze verify --man=no "$unit" 2>&1) && [[ -z $out ]]; then
  ok "verify: no output"
else
  printf '%s\n' "$out" >&2
  fail "verify printed the above (or exited non-zero)"
fi

echo "== systemd-analyze security --offline=true"
sec=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1) || true
score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$sec")
if [[ -z $score ]]; then
  printf '%s\n' "$sec" >&2
  fail "no exposure score in the output above"
elif awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s <= m) }'; then
  ok "exposure $score <= $max_exposure"
else
  grep '✗' <<<"$sec" >&2 || true
  fail "exposure $score > $max_exposure"
fi

echo "== install.sh under DESTDIR"
if [[ ! -f $repo/dist/cli.js ]]; then
  fail "dist/cli.js missing: run 'npm ci && npm run build' first"
  exit 1
fi
root=$t/root
lib=$root/usr/local/lib/etcd-defragd
conf=$root/etc/etcd-defragd/config.yaml
shipped=$repo/config/etcd-defragd.yaml
run_install() { DESTDIR=$root "$install_sh" "$@" >"$t/out" 2>&1 || { cat "$t/out" >&2; return 1; }; }

check "first install" run_install
check "code installed, CLI executable" test -x "$lib/dist/cli.js" -a -f "$lib/package.json"
check "production deps present" test -f "$lib/node_modules/etcd3/package.json"
check "dev deps pruned (typescript, eslint)" test ! -e "$lib/node_modules/typescript" -a ! -e "$lib/node_modules/eslint"
check "no staging leftovers" test -z "$(find "$root/usr/local/lib" -maxdepth 1 -name 'etcd-defragd.*')"
check "symlink resolves to the CLI" test "$(readlink -f "$root/usr/local/bin/etcd-defragd")" = "$(readlink -f "$lib/dist/cli.js")"
check "config installed from the shipped default" cmp -s "$conf" "$shipped"
check "unit ExecStart uses this node" grep -q "^ExecStart=$node --lite-mode /usr/local/lib/etcd-defragd/dist/cli.js run " "$root/etc/systemd/system/etcd-defragd.service"
# The installed tree must run on its production deps alone; 78 (config error) is fine here
# (no kubeadm certs on a CI machine), a missing module is not.
rc=0; ETCD_DEFRAGD_CONFIG=$conf "$node" "$lib/dist/cli.js" check-config >"$t/cc" 2>&1 || rc=$?
if [[ $rc == 0 || $rc == 78 ]] && ! grep -qE 'ERR_MODULE_NOT_FOUND|Cannot find (module|package)' "$t/cc"; then
  ok "installed CLI starts (check-config exit $rc)"
else
  cat "$t/cc" >&2; fail "installed CLI did not start (check-config exit $rc)"
fi

printf '\n# edited by the operator\n' >> "$conf"
cp "$conf" "$t/edited"
check "second install (upgrade)" run_install
check "edited config kept" cmp -s "$conf" "$t/edited"
check "shipped config written as config.yaml.dist" cmp -s "$conf.dist" "$shipped"
check "install says so" grep -q 'config.yaml.dist' "$t/out"
check "previous version kept" test -x "$lib.prev/dist/cli.js"
echo "previous" > "$lib.prev/MARK"
check "rollback" run_install --rollback
check "rollback swapped versions" test -f "$lib/MARK" -a ! -e "$lib.prev/MARK"

check "uninstall" run_install --uninstall
check "code, symlink and unit removed" test ! -e "$lib" -a ! -e "$lib.prev" -a ! -L "$root/usr/local/bin/etcd-defragd" -a ! -e "$root/etc/systemd/system/etcd-defragd.service"
check "config kept" cmp -s "$conf" "$t/edited"
check "uninstall again is a no-op" run_install --uninstall
check "purge" run_install --uninstall --purge
check "/etc/etcd-defragd removed" test ! -e "$root/etc/etcd-defragd"

mkdir -p "$t/nodebin"; ln -s "$node" "$t/nodebin/node"
check "install with --prefix and --node" run_install --prefix /opt/edd --node "$t/nodebin/node"
check "unit follows --prefix and --node" grep -q "^ExecStart=$t/nodebin/node --lite-mode /opt/edd/lib/etcd-defragd/dist/cli.js run " "$root/etc/systemd/system/etcd-defragd.service"
check "symlink under --prefix" test -x "$root/opt/edd/bin/etcd-defragd"
check "purge --prefix" run_install --prefix /opt/edd --purge
check "DESTDIR empty again" test -z "$(find "$root" -mindepth 1 -not -type d)"

if (( boot )); then
  echo "== boot test (systemd-nspawn)"
  # Boots this machine's /usr read-only with a throwaway root (--volatile=yes), so nothing on
  # the host changes; /usr/local gets a tmpfs overlay to install into; a private network keeps
  # the container's 2379/9479 off the host's loopback.
  [[ $EUID -eq 0 ]] || { fail "--boot needs root"; exit 1; }
  command -v systemd-nspawn >/dev/null || { fail "--boot needs systemd-nspawn (apt-get install systemd-container)"; exit 1; }
  etcd_dir=$("$repo/scripts/fetch-etcd.sh" 3.5)
  fix=$t/fixture; mkdir -p "$fix/pki" "$fix/etcd"; cp "$etcd_dir/etcd" "$fix/etcd/"
  (
    cd "$fix/pki"
    printf '[srv]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n[cli]\nextendedKeyUsage=clientAuth\n' > ext.cnf
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=etcd-ca
    for pair in server:srv healthcheck-client:cli; do
      n=${pair%%:*}
      openssl req -newkey rsa:2048 -nodes -keyout "$n.key" -out "$n.csr" -subj "/CN=$n"
      openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$n.crt" -days 2 -extfile ext.cnf -extensions "${pair#*:}"
    done
  ) >/dev/null 2>&1
  cat > "$fix/inside.sh" <<'EOF'
set -u
pki=/etc/kubernetes/pki/etcd
install -d -m 0755 $pki && install -d -m 0700 /var/lib/etcd
for f in ca.crt healthcheck-client.crt healthcheck-client.key server.crt server.key; do install -m 0600 /fixture/pki/$f $pki/$f; done
systemd-run -q --unit=etcd /fixture/etcd/etcd --name m1 --data-dir /var/lib/etcd --snapshot-count 5000 \
  --listen-client-urls https://127.0.0.1:2379 --advertise-client-urls https://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster m1=http://127.0.0.1:2380 --client-cert-auth --trusted-ca-file $pki/ca.crt \
  --cert-file $pki/server.crt --key-file $pki/server.key
# The private network never comes "online": don't let network-online.target wait 2 minutes.
systemctl mask --runtime -q systemd-networkd-wait-online.service
/src/systemd/install.sh >/dev/null || { echo "FAIL install.sh"; exit 1; }
# A forced run on start, so one real defragment happens inside the sandbox.
mkdir -p /etc/systemd/system/etcd-defragd.service.d
printf '[Service]\nEnvironment=ETCD_DEFRAGD_SCHEDULE_RUN_ON_START=true ETCD_DEFRAGD_POLICY_FORCE=true\n' \
  > /etc/systemd/system/etcd-defragd.service.d/boot-test.conf
systemctl daemon-reload
systemctl enable --now etcd-defragd.service || echo "FAIL start"
sleep 20
show() { systemctl show -p "$1" --value etcd-defragd; }
echo "running: $(show ActiveState) restarts=$(show NRestarts)"
curl -sf http://127.0.0.1:9479/metrics > /tmp/metrics && echo "metrics ok" || echo "metrics unreachable"
grep -qE '^etcd_defragd_defrags_total\{result="ok"\} [1-9]' /tmp/metrics && echo "defragmented"
grep -E '^etcd_defragd_process_resident_memory_bytes' /tmp/metrics
# (a one-member cluster warns that leadership cannot move; errors are not expected)
echo "errors: $(journalctl -q -u etcd-defragd -t etcd-defragd -p err -o cat | wc -l)"
systemctl reload etcd-defragd && sleep 2 && echo "after reload $(systemctl is-active etcd-defragd)"
systemctl stop etcd-defragd; echo "after stop: $(show Result) status=$(show ExecMainStatus)"
echo "--- journal"; journalctl -u etcd-defragd --no-pager -o short-precise | tail -n 40
EOF
  timeout 180 systemd-nspawn -q -D / --volatile=yes --register=no --keep-unit --console=pipe -M edd-check-$$ --private-network \
    --overlay=/usr/local::/usr/local --bind-ro="$repo:/src" --bind-ro="$fix:/fixture" -b >"$t/boot.log" 2>&1 &
  ns=$!
  init=
  for _ in $(seq 60); do
    init=$(pgrep -f -n "^/usr/lib/systemd/systemd$|^/lib/systemd/systemd$|^/sbin/init$" -P "$(pgrep -P "$ns" || echo 0)" || true)
    # "degraded" is fine: systemd-firstboot fails on the empty /etc of a volatile root.
    [[ -n $init ]] && [[ $(nsenter -t "$init" -a systemctl is-system-running --wait 2>/dev/null) =~ ^(running|degraded)$ ]] && break
    init=; sleep 1
  done
  if [[ -z $init ]]; then
    cat "$t/boot.log" >&2; fail "container did not boot"
  else
    nsenter -t "$init" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin bash /fixture/inside.sh | tee "$t/inside.log"
    nsenter -t "$init" -a systemctl poweroff --no-block
    wait "$ns" || true
    ns=
    # nspawn cannot remove this itself where /run is not a tmpfs (no systemd on the host)
    rmdir "/run/systemd/nspawn/propagate/edd-check-$$" 2>/dev/null || true
    check "boot: unit active, not restarted" grep -q '^running: active restarts=0$' "$t/inside.log"
    check "boot: metrics on 127.0.0.1:9479" grep -q '^metrics ok$' "$t/inside.log"
    check "boot: one forced defragment succeeded" grep -q '^defragmented$' "$t/inside.log"
    check "boot: no errors logged" grep -q '^errors: 0$' "$t/inside.log"
    check "boot: active after reload" grep -q '^after reload active$' "$t/inside.log"
    check "boot: clean stop" grep -q '^after stop: success status=0$' "$t/inside.log"
  fi
fi

echo
echo "exposure: ${score:-?} (max $max_exposure)"
if (( fails )); then echo "$fails check(s) failed" >&2; exit 1; fi
echo "all systemd checks passed"
