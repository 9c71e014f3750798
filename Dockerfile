# The sample server on a GPU host: `docker compose up` (see docker-compose.yml).
# torch 2.13.0 from PyPI is the CUDA build for Linux x86-64 (it brings its CUDA libraries as wheels),
# so any recent NVIDIA driver with the NVIDIA container toolkit runs it; on a host without a GPU the
# same image serves on the CPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SAMPLEBAY_HOST=0.0.0.0 \
    SAMPLEBAY_PORT=8000 \
    SAMPLEBAY_MODELS_DIR=/models \
    SAMPLEBAY_STATE_DIR=/state

# torch first, in its own layer: the project layer below finds torch==2.13.0 installed and downloads
# nothing more of it.
RUN pip install torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY training ./training
COPY service ./service
# The client's own distribution folder: the server's install brings it along (service.client is its alias).
COPY clients/python ./clients/python
RUN pip install . && python -c "import service.http.app, service.client, samplebay_client, training.runtime.checkpoint"

COPY checkpoints /models
RUN useradd --create-home --uid 1000 samplebay \
    && mkdir -p /state && chown samplebay:samplebay /state
USER samplebay
VOLUME ["/state"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"

# One server process per GPU: the worker owns the device; scale with one container per GPU.
CMD ["python", "-m", "service"]
