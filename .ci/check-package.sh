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
set -euo pipefail

max_exposure=1.1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
clean_root=0 build=1
for a in "$@"; do
  case $a in
    --clean-root) clean_root=1 ;;
    --no-build) build=0 ;;
    *) echo "unknown argument $a" >&2; exit 64 ;;
  esac
done
[[ $EUID -eq 0 ]] || { echo "run as root: it installs and purges the etcd-defragd package" >&2; exit 1; }

t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
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
deb=$(ls dist/pkg/etcd-defragd_*.deb)
rpm=$(ls dist/pkg/etcd-defragd-*.rpm)

echo "== .rpm contents"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]' "$rpm" 2>/dev/null > "$t/rpm-files"
check "rpm: executable on PATH" grep -q '^ -rwxr-xr-x /usr/bin/etcd-defragd$' "$t/rpm-files"
check "rpm: units in /usr/lib/systemd/system" test "$(grep -c ' /usr/lib/systemd/system/etcd-defragd' "$t/rpm-files")" = 3
check "rpm: config.yaml is %config(noreplace)" grep -q '^cn -rw-r--r-- /etc/etcd-defragd/config.yaml$' "$t/rpm-files"
check "rpm: docs and license" grep -q ' /usr/share/doc/etcd-defragd/copyright$' "$t/rpm-files"
check "rpm: scriptlets (daemon-reload, stop on erase, try-restart on upgrade)" \
  bash -c "rpm -qp --scripts '$rpm' 2>/dev/null | grep -q 'daemon-reload' && rpm -qp --scripts '$rpm' 2>/dev/null | grep -q 'disable --now' && rpm -qp --scripts '$rpm' 2>/dev/null | grep -q 'try-restart'"

echo "== install the .deb"
dpkg -s etcd-defragd >/dev/null 2>&1 && { echo "(a previous etcd-defragd is installed: purging it first)"; dpkg --purge etcd-defragd >/dev/null; }
find / -xdev \( -path /proc -o -path /sys -o -path /work -o -path /tmp -o -path "$repo" \) -prune -o -print 2>/dev/null | sort > "$t/before"
check "apt-get install ./$(basename "$deb")" bash -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends '$repo/$deb' >'$t/apt' 2>&1 || { cat '$t/apt'; exit 1; }"
dpkg -L etcd-defragd > "$t/files"
unitdir=$(dirname "$(grep '/etcd-defragd.service$' "$t/files")")
check "executable /usr/bin/etcd-defragd" test -x /usr/bin/etcd-defragd
check "units in the system unit directory ($unitdir)" test -f "$unitdir/etcd-defragd.service" -a -f "$unitdir/etcd-defragd-tls.timer" -a -f "$unitdir/etcd-defragd-tls.service"
check "config.yaml is a conffile" bash -c "dpkg-query -W -f='\${Conffiles}' etcd-defragd | grep -q '^ /etc/etcd-defragd/config.yaml '"
check "docs in /usr/share/doc/etcd-defragd" test -f /usr/share/doc/etcd-defragd/copyright -a -f /usr/share/doc/etcd-defragd/README.md.gz
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
check "apt-get purge" bash -c "DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq etcd-defragd >'$t/apt' 2>&1 || { cat '$t/apt'; exit 1; }"
check "package gone" bash -c '! dpkg -s etcd-defragd >/dev/null 2>&1'
find / -xdev \( -path /proc -o -path /sys -o -path /work -o -path /tmp -o -path "$repo" \) -prune -o -print 2>/dev/null | sort > "$t/after"
# Whatever exists now and did not before the install was left behind (apt's own caches excepted).
comm -13 "$t/before" "$t/after" | grep -v -E '^/var/(cache|lib)/apt/|^/var/log/|^/var/lib/dpkg/' > "$t/left" || true
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
    check "clean root: --version" bash -c "chroot '$root' env -i /usr/bin/etcd-defragd --version | tee /dev/stderr | grep -q 'Node.js v'"
    check "clean root: check-config on an http endpoint" chroot "$root" env -i /usr/bin/etcd-defragd check-config --endpoint http://127.0.0.1:2379
    check "clean root: dpkg --purge" chroot "$root" dpkg --purge etcd-defragd
    check "clean root: nothing left" bash -c "! find '$root' -xdev -name '*etcd-defragd*' -not -path '*/tmp/*' | grep ."
  else
    cat "$t/mm" >&2; fail "mmdebstrap could not build a $suite root"
  fi
fi

echo
if (( fails )); then echo "$fails check(s) failed" >&2; exit 1; fi
echo "all package checks passed (exposure ${score:-?})"
