#!/usr/bin/env bash
# Prints a docker compose env file with a fresh random value for every variable that
# deploy/compose/env.example leaves empty (the operator key named `operator`, or $FLUXSERVE_KEY_NAME):
#   (umask 077; deploy/compose/make_env.sh > deploy/compose/fluxserve.env)
# `make compose-test` makes its throw-away env file this way.
set -euo pipefail
example="$(dirname "$0")/env.example"
random() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }
while IFS= read -r line; do
  case "$line" in
    FLUXSERVE_API_KEYS=) printf 'FLUXSERVE_API_KEYS=%s:%s\n' "${FLUXSERVE_KEY_NAME:-operator}" "$(random)" ;;
    [A-Z]*=) printf '%s%s\n' "$line" "$(random)" ;;
  esac
done < "$example"
