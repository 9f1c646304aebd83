# segpipe on a CUDA machine.
#   docker build -t segpipe .
#   docker run --rm segpipe                                   # prints train.py --help
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

# No fixed uid: some base images already give uid 1000 to a user of their own.
RUN useradd --create-home --shell /bin/bash segpipe \
 && mkdir -p data runs outputs \
 && chown segpipe:segpipe data runs outputs

# The code stays owned by root, so the process can write its outputs but not change itself.
COPY . .

USER segpipe
CMD ["python", "train.py", "--help"]
