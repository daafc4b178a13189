# The one image both launchers run (SLURM via pyxis/enroot or apptainer, Kubernetes via the PyTorchJob).
#   docker build -t REGISTRY/gpt2:0.1.0 .
#   docker build --build-arg BAKE_GPT2_BPE=1 -t REGISTRY/gpt2:0.1.0 .   # bake the GPT-2 BPE files
# BASE_IMAGE must hold python3 with a CUDA torch that satisfies pyproject's pin (torch>=2.4).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# ---- build: a wheel of the package (no compilers needed, nothing of this stage is kept) ----------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpt2 ./gpt2
RUN python3 -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# ---- runtime ----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG BAKE_GPT2_BPE=0
# TIKTOKEN_CACHE_DIR is a directory name, not a secret (DL3064 matches "TOKEN")
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PROGRESS_BAR=off \
    TIKTOKEN_CACHE_DIR=/opt/gpt2/tiktoken \
    GPT2_CACHE_DIR=/workspace/runs/.cache \
    HOME=/home/gpt2 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=100

# Dependencies first (cache-friendly); torch is already in the base and is not reinstalled.
COPY --from=build /wheels /wheels
COPY docker/constraints.txt /wheels/constraints.txt
# The base's torch is pinned for pip, so that no resolution can ever replace it.
RUN python3 -c "import torch; print('torch==' + torch.__version__)" > /wheels/torch-pin.txt \
    && python3 -m pip install --no-cache-dir -c /wheels/constraints.txt -c /wheels/torch-pin.txt \
        "$(ls /wheels/gpt2-*.whl)[s3,slurm]" \
    && python3 -c "import torch, gpt2.train; print('torch', torch.__version__)" \
    && rm -rf /wheels

# Optional: the GPT-2 BPE files, so pods and SLURM jobs need no internet.
COPY docker/tokenizer /opt/gpt2/tokenizer-src
RUN if [ -f /opt/gpt2/tokenizer-src/encoder.json ]; then \
        python3 -m gpt2.tokenizer bake "$TIKTOKEN_CACHE_DIR" /opt/gpt2/tokenizer-src; \
    elif [ "$BAKE_GPT2_BPE" = "1" ]; then \
        python3 -m gpt2.tokenizer bake "$TIKTOKEN_CACHE_DIR"; \
    fi \
    && rm -rf /opt/gpt2/tokenizer-src

RUN useradd --create-home --uid 1000 --user-group gpt2 \
    && mkdir -p /workspace/runs "$TIKTOKEN_CACHE_DIR" \
    && chown -R gpt2:gpt2 /workspace /opt/gpt2
WORKDIR /workspace
COPY --chown=gpt2:gpt2 configs ./configs
COPY docker/entrypoint.sh /usr/local/bin/gpt2-entrypoint
USER 1000
ENTRYPOINT ["/usr/local/bin/gpt2-entrypoint"]
CMD ["train", "configs/demo.yaml"]
