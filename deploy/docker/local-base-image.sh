#!/usr/bin/env bash
# Make the air-gapped base image: Debian bookworm (minbase) + its Python 3.11, imported into the local
# Docker engine as $1 (default fluxserve/bookworm-python:3.11). It stands in for the official
# python:3.11-slim-bookworm image where no container registry can be reached; only Debian's package
# mirror is needed. Idempotent: an existing image of that name is kept.
set -euo pipefail
IMAGE="${1:-fluxserve/bookworm-python:3.11}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE already present"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
root="$(mktemp -d /tmp/fluxserve-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
# libpython3.11: Triton's python backend stub links the shared libpython (the official image has it too).
nice -n 10 debootstrap --variant=minbase \
  --include=python3,python3-venv,libpython3.11,ca-certificates,passwd \
  bookworm "$root" "$MIRROR"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' - "$IMAGE"
echo "imported $IMAGE"
