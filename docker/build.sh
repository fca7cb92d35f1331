#!/bin/sh
# Build the image: sh docker/build.sh [extra `docker build` options, e.g. --no-cache]
# The container user `duser` gets your UID and GID, so files it writes in the repository are yours.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
# Sets IMAGE_NAME, CONTAINER_NAME and MLFLOW_PORT. Not followed by shellcheck, so each script passes alone.
# shellcheck source=/dev/null
. "$REPO/docker/env.sh"

# The build context is the repository; .dockerignore lets only requirements.txt through.
exec docker build \
    --build-arg USER_UID="$(id -u)" \
    --build-arg USER_GID="$(id -g)" \
    --tag "$IMAGE_NAME" \
    --file "$REPO/docker/Dockerfile" \
    "$@" \
    "$REPO"
