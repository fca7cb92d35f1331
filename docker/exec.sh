#!/bin/sh
# A shell in the running container, as duser: sh docker/exec.sh [command ...]  (default: bash)
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
# Sets IMAGE_NAME, CONTAINER_NAME and MLFLOW_PORT. Not followed by shellcheck, so each script passes alone.
# shellcheck source=/dev/null
. "$REPO/docker/env.sh"

if [ $# -eq 0 ]; then
    set -- bash
fi
# A terminal is requested only when there is one: `-t` fails when stdin is a pipe or a file.
if [ -t 0 ]; then
    interactive=-it
else
    interactive=-i
fi
exec docker exec "$interactive" -u duser -w "$REPO" "$CONTAINER_NAME" "$@"
