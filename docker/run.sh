#!/bin/sh
# Start the container in the background: sh docker/run.sh [extra `docker run` options, e.g. -v /data:/data:ro]
# The repository is mounted at the same path as on the host, so absolute paths (the MLflow store, the
# artifact locations written into it, OUTPUT_DIR) mean the same inside and outside. Stop it with
# `docker stop <container name>`; it is removed when stopped.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
# Sets IMAGE_NAME, CONTAINER_NAME and MLFLOW_PORT. Not followed by shellcheck, so each script passes alone.
# shellcheck source=/dev/null
. "$REPO/docker/env.sh"

# The MLflow UI is published on the host's loopback only. Inside the container it must listen on all
# interfaces (MLFLOW_HOST, read by tools/mlflow_ui.sh): Docker forwards the port to the container's own
# address, not to its 127.0.0.1.
set -- \
    --detach --rm --init \
    --name "$CONTAINER_NAME" \
    --shm-size 8g \
    --volume "$REPO:$REPO" \
    --workdir "$REPO" \
    --publish "127.0.0.1:$MLFLOW_PORT:$MLFLOW_PORT" \
    --env "MLFLOW_PORT=$MLFLOW_PORT" \
    --env MLFLOW_HOST=0.0.0.0 \
    "$@"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    set -- --gpus all "$@"
fi
exec docker run "$@" "$IMAGE_NAME" sleep infinity
