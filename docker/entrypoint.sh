#!/bin/sh
# `IMAGE train|prepare|evaluate|sample|checkpoint|bench ARGS` runs `python -m gpt2.<that> ARGS`;
# `IMAGE torchrun ARGS` runs torchrun with the trainers' exit code as its own (gpt2.launch.torchrun:
# 200 when stopped by a signal, so a PyTorchJob restarts the pod); anything else (`bash`) runs as given.
set -e
case "$1" in
    train|prepare|evaluate|sample|checkpoint|bench)
        module="gpt2.$1"
        shift
        exec python3 -m "$module" "$@" ;;
    torchrun)
        shift
        exec python3 -m gpt2.launch.torchrun "$@" ;;
    *) exec "$@" ;;
esac
