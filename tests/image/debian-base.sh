#!/usr/bin/env bash
# A stand-in for `python:3.11-slim`, made from Debian's packages with debootstrap, for machines
# that reach Debian's archive but no container registry (the image test passes it as BASE_IMAGE).
#
#   tests/image/debian-base.sh            prints the image's tag, building it only when missing
#
# Like the public image it has python3.11 as /usr/local/bin/python3 (here a link to Debian's),
# venv, CA certificates, and pip as /usr/local/bin/pip, which the Dockerfile must keep out of the
# runtime image. The tag carries a hash of this script, so editing it makes a new base; the
# root-filesystem tarball is kept in $TASK_TRACKING_IMAGE_CACHE (default /var/cache/task-tracking)
# and re-imported when dockerd lost its images. Needs root, debootstrap and a Docker engine.
set -euo pipefail

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${TASK_TRACKING_IMAGE_CACHE:-/var/cache/task-tracking}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

digest=$(sha256sum "$0" | cut -c1-12)
tag="task-tracking-base/python:3.11-$SUITE-$digest"
tarball="$CACHE/debian-$SUITE-python3.11-$digest.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

started=$SECONDS
if [[ ! -s $tarball ]]; then
  command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
  }
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $SUITE ($PACKAGES) from $MIRROR" >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
  # The public image's layout: the interpreter and pip under /usr/local/bin.
  ln -s /usr/bin/python3 "$root/usr/local/bin/python3"
  ln -s /usr/bin/python3 "$root/usr/local/bin/python"
  ln -s /usr/bin/pip3 "$root/usr/local/bin/pip"
  ln -s /usr/bin/pip3 "$root/usr/local/bin/pip3"
  # Debian's pip refuses to touch the system site-packages (PEP 668); the public image's does not.
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
  rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar --numeric-owner -C "$root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  echo "rootfs: $(du -m "$tarball" | cut -f1) MB in $tarball ($((SECONDS - started)) s)" >&2
fi

docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" "$tag" >/dev/null
echo "imported $tag ($((SECONDS - started)) s)" >&2
echo "$tag"
