#!/usr/bin/env bash
# `make compose-test`: the docker compose `cpu` stack for real, on this machine.
#   1. finds or installs a Docker engine (Debian's docker.io) and a compose CLI (docker compose, or
#      Debian's docker-compose), and starts dockerd (as root) when none answers;
#   2. builds the images (deploy/docker/build.sh: the air-gapped way when no registry answers);
#   3. brings the cpu profile up with two workers, on a free loopback port, under a throw-away
#      project name, env file and volumes;
#   4. runs the smoke suite (tests/compose/) through the facade; 5. brings everything down.
# The restart test SIGKILLs Triton's server process: `docker compose kill triton` would be recorded
# by the engine as a manual stop, which no restart policy restarts (by design).
# FLUXSERVE_COMPOSE_KEEP=1 leaves a failed stack up for `docker compose exec` / `logs`.
# Prints the time each phase took. Needs root (package installs, dockerd) and a few GB of disk.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build/logs
phase_start=$(date +%s); t0=$phase_start
phase() { local now; now=$(date +%s); echo "== [$(( now - phase_start )) s] $1 done"; phase_start=$now; }

if ! command -v dockerd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  command -v docker-compose >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; }
  COMPOSE=(docker-compose)
fi
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: build/logs/dockerd.log)"
  nohup dockerd > build/logs/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi
phase "docker engine"

bash deploy/docker/build.sh
phase "images"

PROJECT="fluxserve-compose-test"
ENV_FILE="build/compose-test.env"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
umask 077
# Fresh random secrets for every variable of the example file (which holds no usable values).
FLUXSERVE_KEY_NAME=compose-test bash deploy/compose/make_env.sh > "$ENV_FILE"
API_KEY="$(sed -n 's/^FLUXSERVE_API_KEYS=[^:]*://p' "$ENV_FILE")"
export FLUXSERVE_API_KEY="$API_KEY"  # the smoke suite's training calls send it
export FLUXSERVE_API_PORT="$PORT"
# `up` waits for the export job and a healthy Triton (many minutes on a busy machine); compose v1
# gives each of its engine calls COMPOSE_HTTP_TIMEOUT seconds (default 60).
export COMPOSE_HTTP_TIMEOUT=7200
COMPOSE+=(-p "$PROJECT" --env-file "$ENV_FILE" --profile cpu)
down() {
  local rc=$?
  "${COMPOSE[@]}" logs --no-color --timestamps > build/logs/compose-test.log 2>&1 || true
  if [ "$rc" != 0 ] && [ "${FLUXSERVE_COMPOSE_KEEP:-0}" = 1 ]; then
    # For investigating a failure against the running stack (docker compose exec / logs).
    echo "== kept the stack up (FLUXSERVE_COMPOSE_KEEP=1): ${COMPOSE[*]} down -v"
  else
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  echo "== compose logs: build/logs/compose-test.log; total $(( $(date +%s) - t0 )) s"
}
trap down EXIT
"${COMPOSE[@]}" up -d --no-build --scale worker=2
phase "compose up (export job, Triton healthy, facade and workers started)"

PYTHON="${PYTHON:-.venv/bin/python}"
FLUXSERVE_COMPOSE_API_URL="http://127.0.0.1:$PORT" \
FLUXSERVE_COMPOSE_CMD="$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${COMPOSE[@]}")" \
  "$PYTHON" -m pytest -ra -v --durations=0 --timeout=3600 -p no:cacheprovider tests/compose
phase "smoke suite"
