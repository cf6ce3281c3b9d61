#!/usr/bin/env bash
# Build fluxserve/redis, fluxserve/app and fluxserve/triton-cpu (tag $FLUXSERVE_IMAGE_TAG, default "local").
#
#   deploy/docker/build.sh            # auto: the official base image + PyPI when a registry answers,
#                                     # else the air-gapped way
#   deploy/docker/build.sh offline    # always the air-gapped way
#
# The air-gapped way, as on the machines this project is developed on: a base image made from
# Debian packages (local-base-image.sh), and this machine's pip settings (CA bundle, find-links wheel
# folder) passed in as PIP_DIR=build/docker-pip. `--network host` lets the build reach the package
# index the way the host does. Heavy steps run under `nice` (shared machines).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE="${1:-auto}"
TAG="${FLUXSERVE_IMAGE_TAG:-local}"
OFFICIAL_BASE="python:3.11-slim-bookworm"
LOCAL_BASE="fluxserve/bookworm-python:3.11"
export DOCKER_BUILDKIT=0  # the engine's classic builder: needs no buildx plugin and no frontend image

if [ "$MODE" = auto ]; then
  if docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 || timeout 60 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    MODE=online
  else
    echo "no container registry answers: building the air-gapped way"
    MODE=offline
  fi
fi

build_args=()
if [ "$MODE" = offline ]; then
  bash deploy/docker/local-base-image.sh "$LOCAL_BASE"
  pip_dir=build/docker-pip
  rm -rf "$pip_dir" && mkdir -p "$pip_dir/wheels"
  cert="${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}"
  links="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
  {
    echo "[global]"
    echo "disable-pip-version-check = true"
    echo "timeout = 180"
    if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" "$pip_dir/ca-bundle.crt"; echo "cert = /tmp/pip/ca-bundle.crt"; fi
    if [ -n "$links" ] && [ -d "$links" ]; then
      # Hard links where possible: the wheels (the CPU torch build) are large.
      cp -l "$links"/*.whl "$pip_dir/wheels/" 2>/dev/null || cp "$links"/*.whl "$pip_dir/wheels/" 2>/dev/null || true
      echo "find-links = /tmp/pip/wheels"
    fi
  } > "$pip_dir/pip.conf"
  build_args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE" --build-arg "PIP_DIR=$pip_dir")
fi

redis_args=()
[ "$MODE" = offline ] && redis_args=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
start=$(date +%s)
nice -n 10 docker build --network host -f deploy/docker/Dockerfile.redis "${redis_args[@]}" -t "fluxserve/redis:$TAG" deploy/docker
echo "built fluxserve/redis:$TAG ($MODE) in $(( $(date +%s) - start )) s"

for target in app triton-cpu; do
  start=$(date +%s)
  nice -n 10 docker build --network host -f deploy/docker/Dockerfile --target "$target" \
    "${build_args[@]}" -t "fluxserve/$target:$TAG" .
  echo "built fluxserve/$target:$TAG ($MODE) in $(( $(date +%s) - start )) s"
done
