#!/usr/bin/env bash
# Builds dist/pkg/etcd-defragd_VERSION-1_ARCH.deb, dist/pkg/etcd-defragd-VERSION-1.RPMARCH.rpm and
# dist/pkg/etcd-defragd-VERSION-linux-ARCH.tar.gz around the single executable of one architecture.
# Called by `npm run package` (scripts/package.ts) after it built that.
#
#   packaging/build.sh EXECUTABLE DEB_ARCH VERSION COMMIT THIRD_PARTY_LICENSES NODE_DIR GEN_DIR
#
# NODE_DIR holds the node the executable was made from (its LICENSE); GEN_DIR what the host's
# executable printed: help.txt (the man page) and config.yaml (init-config --layout kubeadm).
# Needs dpkg-deb and dpkg-shlibdeps (dpkg-dev), rpmbuild (Debian's rpm package), gzip, readelf;
# lintian is run on the .deb when installed (the overrides in packaging/deb/lintian-overrides say why).
set -euo pipefail
umask 022

[[ $# -eq 7 ]] || { sed -n '2,11s/^# \{0,1\}//p' "$0" >&2; exit 64; }
exe=$(realpath "$1") arch=$2 version=$3 commit=$4 licenses=$(realpath "$5") node_dir=$(realpath "$6") gen=$(realpath "$7")
case $arch in
  amd64) rpmarch=x86_64 ;;
  arm64) rpmarch=aarch64 ;;
  *) echo "build.sh: unknown architecture $arch (accepted: amd64, arm64)" >&2; exit 64 ;;
esac
node_version=$(sed -n 's/^node-linux-[a-z0-9]* //p' "$node_dir/.fetched")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(dirname "$exe")
name=etcd-defragd
release=1
maintainer=${PKG_MAINTAINER:-etcd-defragd maintainers <etcd-defragd@users.noreply.github.com>}
# The packages' file dates: the commit's, so two builds of one commit give the same files.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}
summary='defragments the local etcd member, one member at a time across the cluster'

for tool in dpkg-deb dpkg-shlibdeps rpmbuild gzip readelf; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install dpkg-dev rpm)" >&2; exit 1; }
done

work=$(mktemp -d "$out/build/os.XXXXXX")
trap 'rm -rf "$work"' EXIT

# One tree, laid out as on a Debian system; the .rpm takes the same files from it.
# $1 = root, $2 = the unit directory inside it
stage() {
  local root=$1 unitdir=$2 doc=$1/usr/share/doc/$name
  install -D -m 0755 "$exe" "$root/usr/bin/$name"
  for u in etcd-defragd.service etcd-defragd-tls.service etcd-defragd-tls.timer; do
    install -D -m 0644 "$repo/systemd/$u" "$root$unitdir/$u"
  done
  # The conffile is short (the etcd section for kubeadm's layout), so a new default or comment in
  # a later release does not make every upgrade prompt; the reference with every key is a doc.
  install -D -m 0644 "$gen/config.yaml" "$root/etc/$name/config.yaml"
  # Prometheus alert rules and the Grafana dashboard, to load into the cluster's monitoring.
  install -D -m 0644 "$repo/deploy/prometheus/$name-rules.yaml" "$root/usr/share/$name/prometheus/$name-rules.yaml"
  install -D -m 0644 "$repo/deploy/grafana/$name-dashboard.json" "$root/usr/share/$name/grafana/$name-dashboard.json"
  install -d -m 0755 "$doc"
  # Policy 12.3: docs above 4 kB are compressed; copyright never is. README.md stays plain: the
  # units' Documentation= points at it. LICENSE is the full Apache-2.0 text (the .rpm's %license).
  for f in docs/operations.md docs/design.md docs/benchmark.md; do
    gzip -9n < "$repo/$f" > "$doc/$(basename "$f").gz"
  done
  install -m 0644 "$repo/README.md" "$doc/README.md"
  gzip -9n < "$repo/CHANGELOG.md" > "$doc/changelog.gz"
  install -m 0644 "$repo/LICENSE" "$doc/LICENSE"
  install -m 0644 "$repo/config/$name.yaml" "$doc/config.reference.yaml"
  { cat "$licenses"; printf '=== Node.js v%s (the runtime inside the executable)\n' "$node_version"; cat "$node_dir/LICENSE"; } \
    | gzip -9n > "$doc/third-party-licenses.txt.gz"
  cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $name
Comment: /usr/bin/$name is a Node.js single executable: the Node.js v$node_version
 runtime with the etcd-defragd application and its npm dependencies bundled inside.
 The license texts of those packages and of Node.js (MIT, with the licenses of the
 libraries it embeds: V8, OpenSSL, libuv, ICU, zlib, llhttp and others) are in
 /usr/share/doc/$name/third-party-licenses.txt.gz.

Files: *
Copyright: 2025-2026 etcd-defragd maintainers
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.

Files: usr/bin/$name
Copyright: 2025-2026 etcd-defragd maintainers; Node.js contributors; the authors of the bundled npm packages
License: Apache-2.0 and MIT and ISC and BSD-2-clause and BSD-3-clause and Zlib and Unicode-3.0
 The application is Apache-2.0 (/usr/share/common-licenses/Apache-2.0); for
 the runtime and the bundled packages see third-party-licenses.txt.gz.
EOF
  # The manual page: the command's own --help, so the two cannot drift apart.
  install -d -m 0755 "$root/usr/share/man/man8"
  {
    printf '.TH ETCD-DEFRAGD 8 "%s" "etcd-defragd %s" "System Administration"\n' "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" "$version"
    printf '.SH NAME\netcd-defragd \\- %s\n.SH SYNOPSIS\n.nf\n' "$summary"
    sed -n '/^Usage:/,$p' "$gen/help.txt" | sed -e 's/\\/\\e/g' -e 's/^\./\\\&./' -e 's/^-/\\-/'
    printf '.fi\n.SH FILES\n.TP\n/etc/etcd-defragd/config.yaml\nthe configuration (the TLS paths and data dir; every other key at its default)\n'
    printf '.TP\n/usr/share/doc/etcd-defragd/config.reference.yaml\nevery key with its default and a comment\n'
    printf '.SH SEE ALSO\n/usr/share/doc/etcd-defragd/README.md, /usr/share/doc/etcd-defragd/operations.md.gz,\n.BR systemctl (1),\n.BR journalctl (1)\n'
  } | gzip -9n > "$root/usr/share/man/man8/$name.8.gz"
}

# ------------------------------------------------------------------------------------------ .deb
deb=$work/deb
# Debian 12 and Ubuntu 24.04 keep units in /lib/systemd/system (debhelper's choice there).
stage "$deb" /lib/systemd/system
install -d -m 0755 "$deb/DEBIAN" "$deb/usr/share/lintian/overrides"
install -m 0644 "$repo/packaging/deb/lintian-overrides" "$deb/usr/share/lintian/overrides/$name"
gzip -9n > "$deb/usr/share/doc/$name/changelog.Debian.gz" <<EOF
$name ($version-$release) unstable; urgency=medium

  * Built from commit $commit; the changes are in changelog.gz.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
for s in postinst prerm postrm; do install -m 0755 "$repo/packaging/deb/$s" "$deb/DEBIAN/$s"; done
echo "/etc/$name/config.yaml" > "$deb/DEBIAN/conffiles"
# Library dependencies of the executable, as dpkg-shlibdeps computes them for any package.
mkdir -p "$work/shlibs/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" > "$work/shlibs/debian/control"
# A foreign architecture's libraries are not installed here, so dpkg-shlibdeps cannot look them
# up. Its node is built from the same source with the same toolchain as the host's, so it takes
# the host node's dependencies, once readelf (which reads any ELF) shows both need the same
# glibc and libstdc++ symbol versions.
native=$exe
if [[ $arch != "$(dpkg --print-architecture)" ]]; then
  native=$(bash "$repo/scripts/fetch-node.sh" x64)/bin/node
  needs() { readelf -V --wide "$1" | grep -oE '(GLIBC|GLIBCXX|CXXABI)_[0-9.]+' | sort -u | sed 's/_[0-9.]*$//' | uniq | while read -r lib; do
    readelf -V --wide "$1" | grep -oE "${lib}_[0-9.]+" | sort -Vu | tail -1; done; }
  [[ $(needs "$exe") == "$(needs "$native")" ]] || { echo "build.sh: $exe needs other symbol versions than $native:" >&2; diff <(needs "$exe") <(needs "$native") >&2; exit 1; }
fi
depends=$(cd "$work/shlibs" && dpkg-shlibdeps -O "$native" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $depends ]] || { echo "build.sh: dpkg-shlibdeps found no dependencies for $exe" >&2; exit 1; }
cat > "$deb/DEBIAN/control" <<EOF
Package: $name
Version: $version-$release
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$deb" | cut -f1)
Depends: $depends, init-system-helpers (>= 1.54~)
Section: admin
Priority: optional
Description: $summary
 etcd-defragd runs on every control-plane node of a self-managed Kubernetes
 cluster (kubeadm, kubespray, RKE2, k3s) and defragments the local etcd
 member when it needs it. The daemons take a cluster-wide turn, so only one
 member is ever defragmenting; the leader hands over leadership first;
 unhealthy clusters are skipped; the NOSPACE alarm is recovered from and
 disarmed.
 .
 One executable with the Node.js runtime inside: Node.js is not needed.
 The service is installed but neither enabled nor started: edit
 /etc/etcd-defragd/config.yaml (etcd-defragd init-config --layout rke2|k3s|
 kubespray prints one for other layouts), then systemctl enable --now
 etcd-defragd. Not for OpenShift: its cluster-etcd-operator defragments.
EOF
find "$deb" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
debfile=$out/${name}_${version}-${release}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$deb" "$debfile" >/dev/null
echo "built $debfile ($(du -h "$debfile" | cut -f1))"
if [[ ${SKIP_LINTIAN:-} == 1 ]]; then
  echo "lintian: skipped (SKIP_LINTIAN=1)"
elif [[ $arch != "$(dpkg --print-architecture)" ]]; then
  # The same files but the executable's architecture: linting the host's .deb covers them, and
  # lintian takes minutes over a 100 MB binary on a loaded 2-core machine.
  echo "lintian: skipped for $arch (the $(dpkg --print-architecture) .deb with the same files is linted)"
elif command -v lintian >/dev/null; then
  # --fail-on warning: an unexplained warning or error fails the build.
  lintian --fail-on error,warning --tag-display-limit 0 "$debfile"
  echo "lintian: clean (overrides with reasons in packaging/deb/lintian-overrides)"
else
  echo "lintian not installed: skipped (apt-get install lintian)"
fi

# ------------------------------------------------------------------------------------------ .rpm
rpmroot=$work/rpmroot
stage "$rpmroot" /usr/lib/systemd/system
mkdir -p "$work/rpm"/{BUILD,RPMS,SPECS,tmp}
rpmbuild -bb --quiet --target "$rpmarch" --define "pkg_macros $repo/packaging/rpm/macros.systemd" \
  --define "_topdir $work/rpm" --define "_tmppath $work/rpm/tmp" \
  --define "pkg_version $version" --define "pkg_release $release" --define "pkg_root $rpmroot" \
  --define "pkg_maintainer $maintainer" --define "pkg_summary $summary" --define "pkg_node_version $node_version" \
  --define "_binary_payload w6T.xzdio" --define "_buildhost reproducible" --define "use_source_date_epoch_as_buildtime 1" --define "clamp_mtime_to_source_date_epoch 1" \
  "$repo/packaging/rpm/etcd-defragd.spec"
rpmfile=$out/$name-$version-$release.$rpmarch.rpm
mv "$work/rpm/RPMS/$rpmarch/$(basename "$rpmfile")" "$rpmfile"
echo "built $rpmfile ($(du -h "$rpmfile" | cut -f1))"

# --------------------------------------------------------------------------------------- tarball
# For hosts without dpkg or rpm (and immutable ones that run it from /opt): the same files, laid
# out by kind, with the config, the man page, the rules and the dashboard.
tarname=$name-$version-linux-$arch
tr=$work/tar/$tarname
install -D -m 0755 "$exe" "$tr/bin/$name"
for u in etcd-defragd.service etcd-defragd-tls.service etcd-defragd-tls.timer; do install -D -m 0644 "$repo/systemd/$u" "$tr/systemd/$u"; done
install -D -m 0644 "$gen/config.yaml" "$tr/config/config.yaml"
install -D -m 0644 "$repo/config/$name.yaml" "$tr/config/config.reference.yaml"
install -D -m 0644 "$deb/usr/share/man/man8/$name.8.gz" "$tr/man/man8/$name.8.gz"
install -D -m 0644 "$repo/deploy/prometheus/$name-rules.yaml" "$tr/prometheus/$name-rules.yaml"
install -D -m 0644 "$repo/deploy/grafana/$name-dashboard.json" "$tr/grafana/$name-dashboard.json"
for f in README.md LICENSE CHANGELOG.md; do install -m 0644 "$repo/$f" "$tr/$f"; done
install -m 0644 "$deb/usr/share/doc/$name/third-party-licenses.txt.gz" "$tr/third-party-licenses.txt.gz"
tarfile=$out/$tarname.tar.gz
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner -C "$work/tar" -cf - "$tarname" | gzip -9n > "$tarfile"
echo "built $tarfile ($(du -h "$tarfile" | cut -f1))"
