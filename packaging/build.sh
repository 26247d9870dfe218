#!/usr/bin/env bash
# Builds dist/pkg/etcd-defragd_VERSION-1_ARCH.deb and dist/pkg/etcd-defragd-VERSION-1.ARCH.rpm around
# the single executable. Called by `npm run package` (scripts/package.ts) after it built that.
#
#   packaging/build.sh EXECUTABLE VERSION COMMIT THIRD_PARTY_LICENSES
#
# Needs dpkg-deb and dpkg-shlibdeps (dpkg-dev), rpmbuild (Debian's rpm package), gzip; lintian
# is run on the .deb when installed (the overrides in packaging/deb/lintian-overrides say why).
set -euo pipefail
umask 022

[[ $# -eq 4 ]] || { sed -n '2,8s/^# \{0,1\}//p' "$0" >&2; exit 64; }
exe=$(realpath "$1") version=$2 commit=$3 licenses=$(realpath "$4")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(dirname "$exe")
name=etcd-defragd
release=1
maintainer=${PKG_MAINTAINER:-etcd-defragd maintainers <maintainers@users.noreply.r-seed-cab62e16.example>}
# The packages' file dates: the commit's, so two builds of one commit give the same files.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}
summary='defragments the local etcd member, one member at a time across the cluster'

for tool in dpkg-deb dpkg-shlibdeps rpmbuild gzip; do
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
  install -D -m 0644 "$repo/config/$name.yaml" "$root/etc/$name/config.yaml"
  # Prometheus alert rules and the Grafana dashboard, to load into the cluster's monitoring.
  install -D -m 0644 "$repo/deploy/prometheus/$name-rules.yaml" "$root/usr/share/$name/prometheus/$name-rules.yaml"
  install -D -m 0644 "$repo/deploy/grafana/$name-dashboard.json" "$root/usr/share/$name/grafana/$name-dashboard.json"
  install -d -m 0755 "$doc"
  # Policy 12.3: docs above 4 kB are compressed; copyright never is.
  for f in README.md docs/operations.md docs/benchmark.md; do
    gzip -9n < "$repo/$f" > "$doc/$(basename "$f").gz"
  done
  node_license=$(dirname "$(dirname "$(command -v node)")")/share/doc/nodejs/LICENSE
  { cat "$licenses"; printf '=== Node.js %s (the runtime inside the executable)\n' "$(node -p process.version)"
    cat "$node_license" 2>/dev/null || echo "(not found at $node_license; see https://github.com/nodejs/node/blob/main/LICENSE)"; } \
    | gzip -9n > "$doc/third-party-licenses.txt.gz"
  cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $name
Comment: /usr/bin/$name is a Node.js single executable: the Node.js $(node -p process.version)
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
License: Apache-2.0 and MIT and others
 The application is Apache-2.0 (/usr/share/common-licenses/Apache-2.0); for
 the runtime and the bundled packages see third-party-licenses.txt.gz.
EOF
  # The manual page: the command's own --help, so the two cannot drift apart.
  install -d -m 0755 "$root/usr/share/man/man8"
  {
    printf '.TH ETCD-DEFRAGD 8 "%s" "etcd-defragd %s" "System Administration"\n' "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" "$version"
    printf '.SH NAME\netcd-defragd \\- %s\n.SH SYNOPSIS\n.nf\n' "$summary"
    "$exe" --help | sed -n '/^Usage:/,$p' | sed -e 's/\\/\\e/g' -e 's/^\./\\\&./' -e 's/^-/\\-/'
    printf '.fi\n.SH FILES\n.TP\n/etc/etcd-defragd/config.yaml\nthe configuration (every key with its default)\n'
    printf '.SH SEE ALSO\n/usr/share/doc/etcd-defragd/README.md.gz, /usr/share/doc/etcd-defragd/operations.md.gz,\n.BR systemctl (1),\n.BR journalctl (1)\n'
  } | gzip -9n > "$root/usr/share/man/man8/$name.8.gz"
}

# ------------------------------------------------------------------------------------------ .deb
arch=$(dpkg --print-architecture)
deb=$work/deb
# Debian 12 and Ubuntu 24.04 keep units in /lib/systemd/system (debhelper's choice there).
stage "$deb" /lib/systemd/system
install -d -m 0755 "$deb/DEBIAN" "$deb/usr/share/lintian/overrides"
install -m 0644 "$repo/packaging/deb/lintian-overrides" "$deb/usr/share/lintian/overrides/$name"
gzip -9n > "$deb/usr/share/doc/$name/changelog.Debian.gz" <<EOF
$name ($version-$release) unstable; urgency=medium

  * Built from commit $commit; see the project's history for changes.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
for s in postinst prerm postrm; do install -m 0755 "$repo/packaging/deb/$s" "$deb/DEBIAN/$s"; done
echo "/etc/$name/config.yaml" > "$deb/DEBIAN/conffiles"
# Library dependencies of the executable, as dpkg-shlibdeps computes them for any package.
mkdir -p "$work/shlibs/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" > "$work/shlibs/debian/control"
depends=$(cd "$work/shlibs" && dpkg-shlibdeps -O "$deb/usr/bin/$name" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
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
 etcd-defragd runs on every control-plane node of a self-managed
 Kubernetes cluster (kubeadm, kubespray, rke2) and defragments the local etcd
 member when it needs it. The daemons take a cluster-wide turn, so only one
 member is ever defragmenting; the leader hands over leadership first;
 unhealthy clusters are skipped; the NOSPACE alarm is recovered from and
 disarmed.
 .
 One executable with the Node.js runtime inside: Node.js is not needed.
 The service is installed but neither enabled nor started: edit
 /etc/etcd-defragd/config.yaml, then systemctl enable --now etcd-defragd.
EOF
find "$deb" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
debfile=$out/${name}_${version}-${release}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$deb" "$debfile" >/dev/null
echo "built $debfile ($(du -h "$debfile" | cut -f1))"
if [[ ${SKIP_LINTIAN:-} == 1 ]]; then
  echo "lintian: skipped (SKIP_LINTIAN=1)"
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
rpmarch=$(uname -m)
rpmbuild -bb --quiet --target "$rpmarch" \
  --define "_topdir $work/rpm" --define "_tmppath $work/rpm/tmp" \
  --define "pkg_version $version" --define "pkg_release $release" --define "pkg_root $rpmroot" \
  --define "pkg_maintainer $maintainer" --define "pkg_summary $summary" \
  --define "_binary_payload w9.xzdio" --define "_buildhost reproducible" --define "use_source_date_epoch_as_buildtime 1" --define "clamp_mtime_to_source_date_epoch 1" \
  "$repo/packaging/rpm/etcd-defragd.spec"
rpmfile=$out/$name-$version-$release.$rpmarch.rpm
mv "$work/rpm/RPMS/$rpmarch/$(basename "$rpmfile")" "$rpmfile"
echo "built $rpmfile ($(du -h "$rpmfile" | cut -f1))"
