#!/usr/bin/env bash
# Unpacks the runtime libraries the executable links against (ldd: glibc, libstdc++, libgcc_s)
# for one Debian architecture from Debian's packages into DIR, and prints DIR. Maintainer scripts
# are not run (mmdebstrap --variant=extract), so a foreign architecture needs no emulation here.
# Used as qemu-user's library root (-L DIR) and as the base of the OCI image (packaging/image.sh).
#
#   packaging/rootfs.sh DEB_ARCH DIR
set -euo pipefail

[[ $# -eq 2 ]] || { sed -n '2,7s/^# \{0,1\}//p' "$0" >&2; exit 64; }
arch=$1 dir=$2
if [[ -f $dir/.done ]]; then echo "$dir"; exit 0; fi
command -v mmdebstrap >/dev/null || { echo "rootfs.sh: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 1; }
# The suite and mirror of this machine (Debian 12 in CI): the image's glibc is then the one the
# .deb's dependencies were computed against.
# shellcheck source=/dev/null
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
uri=${uri:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
rm -rf "$dir"
mmdebstrap --quiet --mode=root --variant=extract --architectures="$arch" --include=libc6,libgcc-s1,libstdc++6 \
  --keyring="$keyring" --format=directory "$suite" "$dir" "deb $uri $suite main" >&2
touch "$dir/.done"
echo "$dir"
