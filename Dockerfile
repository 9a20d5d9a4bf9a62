# One image for every kvfabric service; the command picks the role.
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and venv (tests build FROM a debootstrapped
# Debian 12, scripts/docker_env.sh, since no registry is reachable there).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /opt/kvfabric
# Metadata first: on a copy-per-layer storage driver (vfs) every step after the heavy layer
# costs a full copy of it, so only the sources come after it.
ENV PIP_NO_CACHE_DIR=1 PATH=/opt/kvfabric/.venv/bin:$PATH PYTHONPATH=/opt/kvfabric
ENTRYPOINT ["kvfabric"]
# The heavy layer (torch and every dependency, several GB) depends only on these two files, so a
# change to the sources keeps it from the cache. README.md is a placeholder (pyproject names it).
# kvfabric itself is installed here with no packages yet: its `kvfabric` command, and PYTHONPATH
# finds the sources copied below. The bundled model is converted on first use (about 20 s).
COPY pyproject.toml ./
COPY scripts/setup scripts/setup
RUN touch README.md && bash scripts/setup
COPY . .
