# HEFT Studio as a Hugging Face Space (Docker SDK): port 7860, non-root uid 1000,
# the data home (with the SQLite database) on local disk; a Storage Bucket at /data holds the run archive.
#   CPU image (default):  docker build -t heft-studio .
#   GPU image (CUDA):     docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t heft-studio:gpu .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

# tini as PID 1: it forwards SIGTERM (docker stop, a Space restart) to the app, which then marks its
# running runs interrupted and stops their training processes, and it reaps orphaned processes.
RUN apt-get update && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

COPY requirements.txt requirements-nodeps.txt ./
# torch comes from TORCH_INDEX (CPU or CUDA build); everything else from PyPI.
RUN pip install --extra-index-url "$TORCH_INDEX" -r requirements.txt \
 && pip install --no-deps -r requirements-nodeps.txt

COPY --chown=user app.py ./
COPY --chown=user app ./app
COPY --chown=user heft_core ./heft_core
COPY --chown=user storage ./storage
COPY --chown=user heft_common ./heft_common

USER user
# HEFT_HOME defaults to ~/.cache/heft-studio inside the container (local disk: SQLite must not live on a
# bucket); with a Storage Bucket attached at /data, runs are archived to /data/heft-archive (storage.archive).
EXPOSE 7860
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "app.py"]
