# One image for every kvfabric service; the command picks the role.
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and venv (tests build FROM a debootstrapped
# Debian 12, scripts/docker_env.sh, since no registry is reachable there).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /opt/kvfabric
ENV PIP_NO_CACHE_DIR=1
# The heavy layer (torch and every dependency, several GB) depends only on these two files, so a
# change to the sources rebuilds the light layers below it and keeps this one from the cache.
# README.md is a placeholder here: pyproject names it and the real one comes with the sources.
COPY pyproject.toml ./
COPY scripts/setup scripts/setup
RUN touch README.md && bash scripts/setup
COPY . .
# Installs kvfabric itself (the dependencies are in place), then converts the bundled model at
# build time so containers start without the 20 s conversion.
RUN bash scripts/setup \
 && .venv/bin/python -c "from engine.models import resolve_model_path; resolve_model_path(None)"
ENV PATH=/opt/kvfabric/.venv/bin:$PATH
ENTRYPOINT ["kvfabric"]
