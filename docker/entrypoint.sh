#!/bin/sh
# `IMAGE train|prepare|evaluate|sample|checkpoint|bench ARGS` runs `python -m gpt2.<that> ARGS`;
# anything else (`torchrun -m gpt2.train ...`, `bash`) runs as given.
set -e
case "$1" in
    train|prepare|evaluate|sample|checkpoint|bench)
        module="gpt2.$1"
        shift
        exec python3 -m "$module" "$@" ;;
    *) exec "$@" ;;
esac
