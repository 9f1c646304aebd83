# segpipe on a CUDA machine.
#   docker build -t segpipe .
#   docker run --rm segpipe                                   # prints train.py --help
#   docker run --rm -p 8000:8000 -v "$PWD/runs:/app/runs:ro" segpipe \
#       python serve.py --checkpoint runs/RUN/best.pt          # the HTTP service on http://localhost:8000
#   docker run --rm --gpus all --shm-size=8g --user "$(id -u):$(id -g)" \
#       -v "$PWD/data:/app/data" -v "$PWD/runs:/app/runs" segpipe \
#       torchrun --nproc_per_node=4 train.py --config configs/CONFIG.yaml
# --shm-size: DataLoader workers pass batches through /dev/shm, which Docker caps at 64 MB.
# --user: files written to the mounted folders then belong to you, not to the image's user.

# The base brings Python, CUDA 12.8, cuDNN 9 and a torch/torchvision pair inside requirements.txt's
# ranges, so pip keeps them rather than downloading the CUDA wheels a second time.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies before code, in their own layer: editing the code does not reinstall them.
COPY requirements.txt .
RUN python -m pip install -r requirements.txt
# serve.py's packages: pyproject.toml's "serve" extra.
RUN python -m pip install "fastapi>=0.115" "uvicorn>=0.37" "prometheus-client>=0.20" "python-multipart>=0.0.18"

# No fixed uid: some base images already give uid 1000 to a user of their own.
RUN useradd --create-home --shell /bin/bash segpipe \
 && mkdir -p data runs outputs \
 && chown segpipe:segpipe data runs outputs

# The code stays owned by root, so the process can write its outputs but not change itself.
COPY . .

USER segpipe
# serve.py listens on every interface inside the container (its default outside one is 127.0.0.1), on port 8000:
# map another host port with -p HOST_PORT:8000 rather than changing --port, which the health check below uses.
ENV SEGPIPE_HOST=0.0.0.0
EXPOSE 8000
# /healthz when the container runs serve.py; containers running anything else (training) count as healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ! grep -qs serve.py /proc/1/cmdline \
        || python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["python", "train.py", "--help"]
