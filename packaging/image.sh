#!/usr/bin/env bash
# Builds dist/pkg/etcd-defragd-VERSION-oci.tar: an OCI image layout (tar) with one image per
# architecture and an image index over them, tagged VERSION. No base image is pulled: each image's
# root is the runtime libraries from Debian's packages (packaging/rootfs.sh: libc6, libgcc-s1,
# libstdc++6), our executable, the short config and the licenses; umoci makes the layer and
# config. The entrypoint is the executable; it runs as a non-root user (65532) unless the pod
# says otherwise (reading kubeadm's root-only keys needs root: see deploy/kubernetes/).
#
#   packaging/image.sh OUT VERSION COMMIT DEB_ARCH=ROOTFS ...
#
# OUT holds the executables (etcd-defragd for amd64, etcd-defragd-arm64) and build/gen/config.yaml.
set -euo pipefail
umask 022

[[ $# -ge 4 ]] || { sed -n '2,11s/^# \{0,1\}//p' "$0" >&2; exit 64; }
out=$(realpath "$1") version=$2 commit=$3
shift 3
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v umoci >/dev/null || { echo "image.sh: umoci not found (apt-get install umoci)" >&2; exit 1; }
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
node_version=$(tr -d ' \n' < "$repo/.node-version")
work=$(mktemp -d "$out/build/image.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout=$work/layout
umoci init --layout "$layout"

entries=()
for pair in "$@"; do
  arch=${pair%%=*} rootfs=${pair#*=}
  case $arch in
    amd64) exe=$out/etcd-defragd ;;
    arm64) exe=$out/etcd-defragd-arm64 ;;
    *) echo "image.sh: unknown architecture $arch (accepted: amd64, arm64)" >&2; exit 64 ;;
  esac
  bundle=$work/bundle-$arch
  umoci new --image "$layout:$arch"
  umoci unpack --image "$layout:$arch" "$bundle" >/dev/null
  r=$bundle/rootfs
  cp -a "$rootfs/." "$r/"
  rm -rf "$r/.done" "$r/var/cache/apt" "$r/var/lib/apt" "$r/etc/apt" "$r/usr/share/doc" "$r/usr/share/lintian" "$r/usr/share/gcc"
  install -D -m 0755 "$exe" "$r/usr/bin/etcd-defragd"
  install -D -m 0644 "$out/build/gen/config.yaml" "$r/etc/etcd-defragd/config.yaml"
  install -D -m 0644 "$repo/LICENSE" "$r/usr/share/doc/etcd-defragd/LICENSE"
  install -D -m 0644 "$out/build/third-party-licenses.txt" "$r/usr/share/doc/etcd-defragd/third-party-licenses.txt"
  install -d -m 1777 "$r/tmp"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\netcd-defragd:x:65532:65532:etcd-defragd:/nonexistent:/usr/sbin/nologin\n' > "$r/etc/passwd"
  printf 'root:x:0:\netcd-defragd:x:65532:\n' > "$r/etc/group"
  find "$r" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  umoci repack --image "$layout:$arch" --history.created "$created" --history.created_by "packaging/image.sh ($commit)" "$bundle" >/dev/null
  labels=(
    "org.opencontainers.image.title=etcd-defragd"
    "org.opencontainers.image.description=Defragments the local etcd member, one member at a time across the cluster"
    "org.opencontainers.image.version=$version"
    "org.opencontainers.image.revision=$commit"
    "org.opencontainers.image.created=$created"
    "org.opencontainers.image.licenses=Apache-2.0"
    "org.opencontainers.image.vendor=etcd-defragd maintainers"
    "org.opencontainers.image.documentation=/usr/share/doc/etcd-defragd"
    "io.etcd-defragd.nodejs=v$node_version"
  )
  label_args=()
  for l in "${labels[@]}"; do label_args+=(--config.label "$l"); done
  umoci config --image "$layout:$arch" --created "$created" --history.created "$created" --author "etcd-defragd maintainers" \
    --architecture "$arch" --os linux --config.user 65532:65532 --config.workingdir / \
    --config.entrypoint /usr/bin/etcd-defragd --config.cmd run \
    --config.env NODE_ENV=production --config.env ETCD_DEFRAGD_LOG_FORMAT=json --config.stopsignal SIGTERM \
    "${label_args[@]}" >/dev/null
  umoci gc --layout "$layout"
  desc=$(jq -c --arg t "$arch" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)' "$layout/index.json")
  entries+=("$(jq -c --arg a "$arch" '{mediaType, digest, size, platform: {architecture: $a, os: "linux"}}' <<<"$desc")")
done

# The image index over both architectures: a blob, named VERSION and latest in index.json (the
# per-architecture tags stay, for `podman run oci-archive:FILE:amd64`).
idx=$work/index-blob.json
printf '%s\n' "${entries[@]}" | jq -cs --arg v "$version" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: ., annotations: {"org.opencontainers.image.version": $v}}' | tr -d '\n' > "$idx"
digest=sha256:$(sha256sum "$idx" | cut -d' ' -f1)
cp "$idx" "$layout/blobs/sha256/${digest#sha256:}"
size=$(stat -c %s "$idx")
jq --arg d "$digest" --argjson s "$size" --arg v "$version" \
  '.manifests += [{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s, annotations: {"org.opencontainers.image.ref.name": $v}},
                  {mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s, annotations: {"org.opencontainers.image.ref.name": "latest"}}]' \
  "$layout/index.json" > "$work/index.json"
mv "$work/index.json" "$layout/index.json"
find "$layout" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
tarfile=$out/etcd-defragd-$version-oci.tar
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$tarfile" .
echo "built $tarfile ($(du -h "$tarfile" | cut -f1)): $(jq -r '[.manifests[].annotations["org.opencontainers.image.ref.name"]] | join(", ")' "$layout/index.json")"
