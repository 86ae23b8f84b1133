# llada-serve on a CUDA PyTorch runtime.
#
#   docker build -t llada-serve .
#   docker run --gpus all --init -p 8000:8000 --stop-timeout 45 \
#     -v /srv/models/LLaDA-8B-Instruct:/models/llada:ro -e LLADA_MODEL=/models/llada llada-serve
#
# Without LLADA_MODEL the image serves the small embedded default model (weights/default/).
# Any flag of `llada-serve` can be appended to `docker run ... llada-serve` or given as LLADA_* env.

# The base image already carries torch (with CUDA 12.4) and triton, which pip then keeps.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/llada-serve

# Metadata first, then the packages (the embedded default model lives in weights/default/).
COPY pyproject.toml README.md ./
COPY server ./server
COPY sampler ./sampler
COPY kernels ./kernels
COPY weights ./weights
COPY evaluation ./evaluation

RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/llada llada \
 && mkdir -p /models /home/llada/.cache \
 && chown llada:llada /models /home/llada/.cache

# Listen on every interface inside the container; the model comes from a mounted volume
# (set LLADA_MODEL to its path under /models). Compiled Triton kernels go to a writable cache.
ENV LLADA_HOST=0.0.0.0 \
    LLADA_PORT=8000 \
    LLADA_SHUTDOWN_GRACE=30 \
    HOME=/home/llada \
    XDG_CACHE_HOME=/home/llada/.cache \
    TRITON_CACHE_DIR=/home/llada/.cache/triton

VOLUME ["/models"]
EXPOSE 8000

USER 10001:10001
WORKDIR /home/llada

# /health answers while the process is alive; readiness (/ready) is left to orchestrators.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LLADA_PORT', '8000'), timeout=4)"]

# Exec form: llada-serve is PID 1's child under --init (or PID 1 itself) and receives SIGTERM
# directly; it stops taking requests and drains in-flight ones for LLADA_SHUTDOWN_GRACE seconds,
# so give `docker stop` a longer timeout (--stop-timeout / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["llada-serve"]
