#!/usr/bin/env bash
# Checks the packages (issue 9): builds them (npm run package: executable, .deb, .rpm, lintian),
# installs the .deb on this machine, checks the installed units (systemd-analyze verify and
# security), runs the installed /usr/bin/etcd-defragd with no node on PATH against a real TLS
# cluster (test/package/installed.test.ts), keeps an edited conffile on reinstall, purges, and
# checks that nothing of the package is left. Run as root on Debian/Ubuntu (CI does).
#
#   .ci/check-package.sh                 all of the above
#   .ci/check-package.sh --clean-root    also installs the .deb in a throwaway minimal Debian root
#                                        (mmdebstrap, no Node.js in it), runs it there and purges it
#   .ci/check-package.sh --no-build      use the packages already in dist/pkg
#   .ci/check-package.sh --boot          also boots a throwaway systemd container (systemd-nspawn,
#                                        from systemd-container) that runs the installed unit for
#                                        real: kubespray-like TLS paths owned by another user,
#                                        a forced defragment, a certificate renewal, reload, stop
set -euo pipefail

max_exposure=1.1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
clean_root=0 build=1 boot=0
for a in "$@"; do
  case $a in
    --clean-root) clean_root=1 ;;
    --no-build) build=0 ;;
    --boot) boot=1 ;;
    *) echo "unknown argument $a" >&2; exit 64 ;;
  esac
done
[[ $EUID -eq 0 ]] || { echo "run as root: it installs and purges the etcd-defragd package" >&2; exit 1; }

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

echo "== shellcheck"
if command -v shellcheck >/dev/null; then
  check "shellcheck packaging and CI scripts" shellcheck -s sh packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm
  check "shellcheck build.sh, check-package.sh" shellcheck packaging/build.sh "${BASH_SOURCE[0]}"
else
  echo "skip shellcheck: not installed (apt-get install shellcheck)"
fi

if (( build )); then
  echo "== npm run package"
  npm run --silent package
fi
deb=$(ls dist/pkg/etcd-defragd_*_amd64.deb)
rpm=$(ls dist/pkg/etcd-defragd-*.x86_64.rpm)
node_version=v$(tr -d ' \n' < .node-version)

echo "== release artifacts (issue 16): both architectures, SHA256SUMS"
for a in amd64:x86_64 arm64:aarch64; do
  check "dist/pkg: .deb, .rpm and tarball for ${a%%:*}" test -f "dist/pkg/etcd-defragd_$(jq -r .version package.json)-1_${a%%:*}.deb" \
    -a -f "dist/pkg/etcd-defragd-$(jq -r .version package.json)-1.${a#*:}.rpm" -a -f "dist/pkg/etcd-defragd-$(jq -r .version package.json)-linux-${a%%:*}.tar.gz"
done
# shellcheck disable=SC2016 # expanded by the inner bash
check "SHA256SUMS verifies every artifact" bash -c 'cd dist/pkg && sha256sum --quiet -c SHA256SUMS && test "$(wc -l < SHA256SUMS)" -ge 7'
check "tarball: executable, units, config, man page, rules, dashboard" bash -c "tar tzf dist/pkg/etcd-defragd-*-linux-amd64.tar.gz | sed 's|^[^/]*/||' | sort | grep -c -x -e bin/etcd-defragd -e systemd/etcd-defragd.service -e config/config.yaml -e man/man8/etcd-defragd.8.gz -e prometheus/etcd-defragd-rules.yaml -e grafana/etcd-defragd-dashboard.json -e LICENSE | grep -qx 7"
# ELF, 64-bit, little-endian, e_machine 0xb7 (AArch64)
check "arm64 .deb: arm64 ELF executable" bash -c "dpkg-deb -x dist/pkg/etcd-defragd_*_arm64.deb '$t/arm-deb' && od -An -tx1 -N20 '$t/arm-deb/usr/bin/etcd-defragd' | tr -d ' \n' | grep -q '^7f454c460201.*0200b700\$'"

echo "== arm64 executable under qemu-user (its libraries from Debian's arm64 packages)"
export arm_root=dist/pkg/build/rootfs-arm64
if [[ -x $(command -v qemu-aarch64-static) && -d $arm_root ]]; then
  arm() { qemu-aarch64-static -L "$arm_root" dist/pkg/etcd-defragd-arm64 "$@"; }
  check "arm64: --version names Node.js $node_version" bash -c "$(declare -f arm); arm --version | tee -a /dev/stderr | grep -q 'Node.js $node_version)\$'"
  mkdir -p "$t/arm-data/member/snap"
  check "arm64: check-config passes with a member in etcd.dataDir" bash -c "$(declare -f arm); arm check-config --endpoint http://127.0.0.1:2379 --set etcd.dataDir='$t/arm-data' >/dev/null"
  # shellcheck disable=SC2016 # expanded by the inner bash
  check "arm64: check-config names a wrong etcd.dataDir (exit 78)" bash -c "$(declare -f arm)"'; rc=0; arm check-config --endpoint http://127.0.0.1:2379 --set etcd.dataDir=/nonexistent 2>"$0" || rc=$?; [[ $rc == 78 ]] && grep -q "etcd.dataDir: \"/nonexistent\" holds no etcd member" "$0"' "$t/arm-cc"
else
  fail "arm64: qemu-aarch64-static (qemu-user-static) or $arm_root missing"
fi

echo "== .rpm contents"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]' "$rpm" 2>/dev/null > "$t/rpm-files"
check "rpm: executable on PATH" grep -q '^ -rwxr-xr-x /usr/bin/etcd-defragd$' "$t/rpm-files"
check "rpm: units in /usr/lib/systemd/system" test "$(grep -c ' /usr/lib/systemd/system/etcd-defragd' "$t/rpm-files")" = 3
check "rpm: config.yaml is %config(noreplace)" grep -q '^cn -rw-r--r-- /etc/etcd-defragd/config.yaml$' "$t/rpm-files"
check "rpm: docs and license" grep -q ' /usr/share/doc/etcd-defragd/LICENSE$' "$t/rpm-files"
rpm -qp --scripts "$rpm" 2>/dev/null > "$t/rpm-scripts"
check "rpm: %systemd_* scriptlets expanded (preset on install, disable --now on erase, try-restart on upgrade)" \
  bash -c "grep -q 'preset etcd-defragd.service' '$t/rpm-scripts' && grep -q 'disable --now etcd-defragd.service' '$t/rpm-scripts' && grep -q 'try-restart etcd-defragd.service' '$t/rpm-scripts' && ! grep -q '%systemd' '$t/rpm-scripts'"
# SPDX: upper-case AND/OR/WITH between identifiers; every identifier on the SPDX list (the few used here).
check "rpm: License is an SPDX expression" bash -c "rpm -qp --qf '%{LICENSE}' '$rpm' 2>/dev/null | grep -qxE '(Apache-2\.0|MIT|ISC|BSD-2-Clause|BSD-3-Clause|Zlib|Unicode-3\.0)( AND (Apache-2\.0|MIT|ISC|BSD-2-Clause|BSD-3-Clause|Zlib|Unicode-3\.0))*'"
check "rpm: Provides bundled(nodejs) = ${node_version#v}" bash -c "rpm -qp --provides '$rpm' 2>/dev/null | grep -qx 'bundled(nodejs) = ${node_version#v}'"

echo "== OCI image: index over amd64 and arm64, non-root user, entrypoint, labels"
oci=$(ls dist/pkg/etcd-defragd-*-oci.tar)
mkdir -p "$t/oci" && tar -xf "$oci" -C "$t/oci"
blob() { cat "$t/oci/blobs/sha256/${1#sha256:}"; }
version=$(jq -r .version package.json)
idx=$(jq -r --arg v "$version" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $v) | .digest' "$t/oci/index.json")
check "index.json names $version: an image index" test "$(blob "$idx" | jq -r .mediaType)" = application/vnd.oci.image.index.v1+json
check "the index lists linux/amd64 and linux/arm64" test "$(blob "$idx" | jq -r '[.manifests[].platform | .os + "/" + .architecture] | sort | join(",")')" = linux/amd64,linux/arm64
for m in $(blob "$idx" | jq -r '.manifests[].digest'); do
  cfg=$(blob "$m" | jq -r .config.digest)
  arch=$(blob "$cfg" | jq -r .architecture)
  check "image $arch: entrypoint /usr/bin/etcd-defragd run, user 65532" \
    test "$(blob "$cfg" | jq -c '[.config.Entrypoint, .config.Cmd, .config.User]')" = '[["/usr/bin/etcd-defragd"],["run"],"65532:65532"]'
  check "image $arch: OCI labels (version, revision, licenses, source of the runtime)" \
    test "$(blob "$cfg" | jq -r --arg v "$version" '.config.Labels | [.["org.opencontainers.image.version"] == $v, (.["org.opencontainers.image.revision"] | length > 0), .["org.opencontainers.image.licenses"] == "Apache-2.0"] | all')" = true
  blob "$(blob "$m" | jq -r '.layers[-1].digest')" | tar -tzf - > "$t/layer-$arch"
  check "image $arch: executable, config, libc, passwd; no shell, no package manager" bash -c "sed 's|^\./||' '$t/layer-$arch' > '$t/layer-$arch.n' && grep -qx 'usr/bin/etcd-defragd' '$t/layer-$arch.n' && grep -qx 'etc/etcd-defragd/config.yaml' '$t/layer-$arch.n' && grep -q '/libc.so.6\$' '$t/layer-$arch.n' && grep -qx 'etc/passwd' '$t/layer-$arch.n' && ! grep -qE '^(usr/)?bin/(sh|bash|dash|apt|dpkg)\$' '$t/layer-$arch.n'"
done
if command -v podman >/dev/null && command -v runc >/dev/null; then
  check "image amd64 run by podman (runc) against a real TLS cluster: --version, once defragments" \
    env ETCD_DEFRAGD_IMAGE="oci-archive:$repo/$oci:amd64" node --import tsx --test --test-reporter=dot test/package/image.test.ts
else
  echo "skip running the image: podman or runc not installed (apt-get install podman runc)"
fi

echo "== install the .deb"
dpkg -s etcd-defragd >/dev/null 2>&1 && { echo "(a previous etcd-defragd is installed: purging it first)"; dpkg --purge etcd-defragd >/dev/null; }
# Where a package or its scripts write: a snapshot before the install, compared after the purge.
snapshot() { find /etc /usr /var/lib /opt /srv /run -xdev \( -path /var/lib/apt -o -path /var/lib/dpkg -o -path /run/user \) -prune -o -print 2>/dev/null | sort; }
snapshot > "$t/before"
check "apt-get install ./$(basename "$deb")" bash -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends '$repo/$deb' >'$t/apt' 2>&1 || { cat '$t/apt'; exit 1; }"
dpkg -L etcd-defragd > "$t/files"
unitdir=$(dirname "$(grep '/etcd-defragd.service$' "$t/files")")
check "executable /usr/bin/etcd-defragd" test -x /usr/bin/etcd-defragd
check "units in the system unit directory ($unitdir)" test -f "$unitdir/etcd-defragd.service" -a -f "$unitdir/etcd-defragd-tls.timer" -a -f "$unitdir/etcd-defragd-tls.service"
check "config.yaml is a conffile" bash -c "dpkg-query -W -f='\${Conffiles}' etcd-defragd | grep -q '^ /etc/etcd-defragd/config.yaml '"
check "docs in /usr/share/doc/etcd-defragd" test -f /usr/share/doc/etcd-defragd/copyright -a -f /usr/share/doc/etcd-defragd/README.md -a -f /usr/share/doc/etcd-defragd/changelog.gz -a -f /usr/share/doc/etcd-defragd/config.reference.yaml
check "conffile is short (TLS paths and data dir), the reference is a doc" bash -c "test \$(grep -vc '^#' /etc/etcd-defragd/config.yaml) -le 12 && grep -q '^  dataDir: /var/lib/etcd$' /etc/etcd-defragd/config.yaml"
# shellcheck disable=SC2016 # expanded by the inner bash
check "every Documentation= of the units resolves (man page or a plain file)" bash -c 'for d in $(sed -n "s/^Documentation=//p" "$0"/etcd-defragd*.service "$0"/etcd-defragd*.timer); do
  case $d in man:*) p=${d#man:}; man -w "${p%%(*}" >/dev/null 2>&1 || test -f "/usr/share/man/man8/${p%%(*}.8.gz" || exit 1 ;; file://*) test -f "${d#file://}" || exit 1 ;; https://*) ;; *) exit 1 ;; esac; done' "$unitdir"
check "alert rules and dashboard in /usr/share/etcd-defragd" test -f /usr/share/etcd-defragd/prometheus/etcd-defragd-rules.yaml -a -f /usr/share/etcd-defragd/grafana/etcd-defragd-dashboard.json
check "not enabled on install" test ! -e /etc/systemd/system/multi-user.target.wants/etcd-defragd.service
# shellcheck disable=SC2016 # expanded by the inner bash
check "installed config validates (kubeadm paths absent here: 78 names the key)" \
  bash -c 'rc=0; env -i /usr/bin/etcd-defragd check-config >/dev/null 2>"$0" || rc=$?; [[ $rc == 0 ]] || { [[ $rc == 78 ]] && grep -q "etcd.caFile" "$0"; }' "$t/cc"

echo "== installed units: systemd-analyze"
if out=$(systemd-analyze verify --man=no "$unitdir/etcd-defragd.service" "$unitdir/etcd-defragd-tls.service" "$unitdir/etcd-defragd-tls.timer" 2>&1) && [[ -z $out ]]; then
  ok "verify: no output"
else
  printf '%s\n' "$out" >&2; fail "verify printed the above (or exited non-zero)"
fi
sec=$(systemd-analyze security --offline=true --no-pager "$unitdir/etcd-defragd.service" 2>&1) || true
score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$sec")
if [[ -n $score ]] && awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s <= m) }'; then
  ok "exposure $score <= $max_exposure"
else
  grep '✗' <<<"$sec" >&2 || printf '%s\n' "$sec" >&2
  fail "exposure ${score:-?} > $max_exposure"
fi

echo "== the installed executable against a real cluster, no node on PATH"
check "test/package/installed.test.ts" env ETCD_DEFRAGD_EXE=/usr/bin/etcd-defragd node --import tsx --test --test-reporter=dot test/package/installed.test.ts

echo "== reinstall keeps an edited config"
printf '\n# edited by the operator\n' >> /etc/etcd-defragd/config.yaml
cp /etc/etcd-defragd/config.yaml "$t/edited"
check "dpkg -i again" bash -c "dpkg -i '$repo/$deb' >'$t/dpkg' 2>&1 || { cat '$t/dpkg'; exit 1; }"
check "edited config kept" cmp -s /etc/etcd-defragd/config.yaml "$t/edited"

echo "== purge"
# What an administrator created stays: a password file beside the config, a drop-in.
echo secret > /etc/etcd-defragd/etcd-password
mkdir -p /etc/systemd/system/etcd-defragd.service.d && printf '[Service]\nEnvironment=X=1\n' > /etc/systemd/system/etcd-defragd.service.d/override.conf
check "apt-get purge" bash -c "DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq etcd-defragd >'$t/apt' 2>&1 || { cat '$t/apt'; exit 1; }"
check "package gone" bash -c '! dpkg -s etcd-defragd >/dev/null 2>&1'
check "purge kept the admin's password file and drop-in, removed the conffile" \
  test -f /etc/etcd-defragd/etcd-password -a -f /etc/systemd/system/etcd-defragd.service.d/override.conf -a ! -e /etc/etcd-defragd/config.yaml
rm -rf /etc/etcd-defragd /etc/systemd/system/etcd-defragd.service.d
snapshot > "$t/after"
# New since before the install, and ours: a packaged path or one that names us (the machine is
# shared: other jobs may install or write things meanwhile).
comm -13 "$t/before" "$t/after" | grep -F -x -f "$t/files" > "$t/left" || true
comm -13 "$t/before" "$t/after" | grep 'defragd' >> "$t/left" || true
if [[ -s $t/left ]]; then cat "$t/left" >&2; fail "left behind after purge (above)"; else ok "nothing left: no new path on the file system after purge"; fi
check "no dpkg state left" bash -c '! ls /var/lib/dpkg/info/etcd-defragd.* >/dev/null 2>&1'

if (( clean_root )); then
  echo "== a clean minimal Debian root without Node.js (mmdebstrap)"
  command -v mmdebstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq mmdebstrap; }
  # shellcheck source=/dev/null
  suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
  root=$t/root
  if mmdebstrap --quiet --variant=minbase --mode=root --format=directory "$suite" "$root" >"$t/mm" 2>&1; then
    cp "$deb" "$root/tmp/"
    check "clean root: no node" bash -c "! chroot '$root' sh -c 'command -v node nodejs'"
    check "clean root: dpkg -i" chroot "$root" dpkg -i "/tmp/$(basename "$deb")"
    check "clean root: --version names Node.js $node_version" bash -c "chroot '$root' env -i /usr/bin/etcd-defragd --version | tee -a /dev/stderr | grep -q 'Node.js $node_version)\$'"
    # shellcheck disable=SC2016 # expanded by the inner bash
    check "clean root: check-config names etcd.dataDir when it holds no member (exit 78)" bash -c 'rc=0; chroot "$1" env -i /usr/bin/etcd-defragd check-config --endpoint http://127.0.0.1:2379 >/dev/null 2>"$0" || rc=$?; [[ $rc == 78 ]] && grep -q "etcd.dataDir: \"/var/lib/etcd\" holds no etcd member" "$0"' "$t/cr-cc" "$root"
    mkdir -p "$root/var/lib/etcd/member/snap"
    check "clean root: check-config on an http endpoint, a member in etcd.dataDir" chroot "$root" env -i /usr/bin/etcd-defragd check-config --endpoint http://127.0.0.1:2379
    rm -rf "$root/var/lib/etcd"
    check "clean root: dpkg --purge" chroot "$root" dpkg --purge etcd-defragd
    check "clean root: nothing left" bash -c "! find '$root' -xdev -name '*etcd-defragd*' -not -path '*/tmp/*' | grep ."
  else
    cat "$t/mm" >&2; fail "mmdebstrap could not build a $suite root"
  fi
fi

if (( boot )); then
  echo "== boot test: the installed package under a real systemd (systemd-nspawn)"
  # Boots this machine's /usr read-only with a throwaway root (--volatile=yes), so nothing on the
  # host changes: the package is installed on the host for this and purged after. A private
  # network keeps the container's 2379/9479 off the host's loopback. The TLS files sit in a
  # kubespray-like place, owned by a non-root user, mode 0600: only root can read them.
  command -v systemd-nspawn >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd-container; }
  dpkg -i "$deb" >/dev/null
  etcd_dir=$(bash scripts/fetch-etcd.sh 3.5)
  fix=$t/fixture; mkdir -p "$fix/pki" "$fix/etcd"; cp "$etcd_dir/etcd" "$fix/etcd/"
  (
    cd "$fix/pki"
    printf '[srv]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n[cli]\nextendedKeyUsage=clientAuth\n' > ext.cnf
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=etcd-ca
    for pair in server:srv admin-node1:cli renewed:cli; do
      n=${pair%%:*}
      openssl req -newkey rsa:2048 -nodes -keyout "$n-key.pem" -out "$n.csr" -subj "/CN=$n"
      openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$n.pem" -days 2 -extfile ext.cnf -extensions "${pair#*:}"
    done
  ) >/dev/null 2>&1
  cat > "$fix/inside.sh" <<'EOF'
set -u
pki=/etc/ssl/etcd/ssl
install -d -m 0700 $pki /var/lib/etcd
for f in ca.pem server.pem server-key.pem admin-node1.pem admin-node1-key.pem; do install -m 0600 /fixture/pki/$f $pki/$f; done
chown -R 4242:4242 $pki
systemd-run -q --unit=etcd /fixture/etcd/etcd --name m1 --data-dir /var/lib/etcd --snapshot-count 5000 \
  --listen-client-urls https://127.0.0.1:2379 --advertise-client-urls https://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster m1=http://127.0.0.1:2380 --client-cert-auth --trusted-ca-file $pki/ca.pem \
  --cert-file $pki/server.pem --key-file $pki/server-key.pem
systemctl mask --runtime -q systemd-networkd-wait-online.service
# The operator's only change: config.yaml names the files (and a forced run on start, so one
# real defragment happens inside the sandbox; this test cluster has one member).
mkdir -p /etc/etcd-defragd
cat > /etc/etcd-defragd/config.yaml <<YAML
etcd:
  caFile: $pki/ca.pem
  certFile: $pki/admin-node1.pem
  keyFile: $pki/admin-node1-key.pem
schedule:
  runOnStart: true
policy:
  force: true
  singleMember: true
YAML
systemctl daemon-reload
systemctl enable --now etcd-defragd.service || echo "FAIL start"
sleep 20
show() { systemctl show -p "$1" --value "${2:-etcd-defragd}"; }
echo "running: $(show ActiveState) restarts=$(show NRestarts)"
echo "timer: $(show ActiveState etcd-defragd-tls.timer)"
uid=$(show MainPID | xargs -I{} stat -c %u /proc/{})
echo "staged: $(stat -c '%a %u' /run/etcd-defragd/credentials/etcd-key) service-uid=$uid"
curl -sf http://127.0.0.1:9479/metrics > /tmp/metrics && echo "metrics ok" || echo "metrics unreachable"
grep -qE '^etcd_defragd_defrags_total\{result="ok"\} [1-9]' /tmp/metrics && echo "defragmented"
echo "errors: $(journalctl -q -u etcd-defragd -p err -o cat | wc -l)"
# Output that is not a log line of ours (a runtime warning) would have no event= field.
echo "stray: $(journalctl -q -u etcd-defragd -t etcd-defragd -p warning -o cat | grep -vc 'event=')"
# A renewal: new client pair on disk; the timer's service copies it; the daemon reconnects.
install -m 0600 -o 4242 -g 4242 /fixture/pki/renewed-key.pem $pki/admin-node1-key.pem
install -m 0600 -o 4242 -g 4242 /fixture/pki/renewed.pem $pki/admin-node1.pem
systemctl start etcd-defragd-tls.service
cmp -s /run/etcd-defragd/credentials/etcd-cert /fixture/pki/renewed.pem && echo "renewed staged"
sleep 15
journalctl -q -u etcd-defragd -o cat | grep -q 'event=tls.changed' && echo "reconnected"
echo "after renewal: $(show ActiveState) restarts=$(show NRestarts) errors=$(journalctl -q -u etcd-defragd -p err -o cat | wc -l)"
systemctl reload etcd-defragd && sleep 2 && echo "after reload $(systemctl is-active etcd-defragd)"
systemctl stop etcd-defragd; echo "after stop: $(show Result) status=$(show ExecMainStatus) rundir=$(test -e /run/etcd-defragd && echo left || echo gone)"
echo "--- journal"; journalctl -u etcd-defragd --no-pager -o short-precise | tail -n 30
EOF
  # An empty /etc boots as a first boot, when systemd applies the presets (Debian's: enable all).
  # The package itself never enables the unit; keep it that way here too.
  mkdir -p "$fix/preset"
  printf 'disable etcd-defragd.service\ndisable etcd-defragd-tls.timer\n' > "$fix/preset/10-etcd-defragd.preset"
  ns=
  timeout 180 systemd-nspawn -q -D / --volatile=yes --register=no --keep-unit --console=pipe -M "edd-check-$$" --private-network \
    --bind-ro="$fix:/fixture" --bind-ro="$fix/preset:/etc/systemd/system-preset" -b >"$t/boot.log" 2>&1 &
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
    # nspawn cannot remove this itself where /run is not a tmpfs (no systemd on the host)
    rmdir "/run/systemd/nspawn/propagate/edd-check-$$" 2>/dev/null || true
    check "boot: unit active, not restarted" grep -q '^running: active restarts=0$' "$t/inside.log"
    check "boot: renewal timer active" grep -q '^timer: active$' "$t/inside.log"
    check "boot: TLS copies 0400, owned by the service's dynamic user" bash -c "grep -Eq '^staged: 400 ([0-9]+) service-uid=\\1$' '$t/inside.log'"
    check "boot: metrics on 127.0.0.1:9479" grep -q '^metrics ok$' "$t/inside.log"
    check "boot: one forced defragment succeeded" grep -q '^defragmented$' "$t/inside.log"
    check "boot: no errors logged" grep -q '^errors: 0$' "$t/inside.log"
    check "boot: nothing but log lines at warning priority" grep -q '^stray: 0$' "$t/inside.log"
    check "boot: renewed certificate staged by the timer's service" grep -q '^renewed staged$' "$t/inside.log"
    check "boot: the daemon reconnected with it, no restart, no error" bash -c "grep -q '^reconnected$' '$t/inside.log' && grep -q '^after renewal: active restarts=0 errors=0$' '$t/inside.log'"
    check "boot: active after reload" grep -q '^after reload active$' "$t/inside.log"
    check "boot: clean stop, copies gone" grep -q '^after stop: success status=0 rundir=gone$' "$t/inside.log"
  fi
  dpkg --purge etcd-defragd >/dev/null
fi

echo
if (( fails )); then echo "$fails check(s) failed" >&2; exit 1; fi
echo "all package checks passed (exposure ${score:-?})"
