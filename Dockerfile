# pagepool-emu in a container: one image for `emu run`, `emu coordinator` and `emu host` (docs/docker.md).
#
# The build needs no network: Python packages come from the wheelhouse build/wheels, which
# scripts/docker-build.sh prepares on the host (the project's wheel and every runtime dependency).
# BASE_IMAGE is any Debian-like image with Python 3.11 and its venv module: the official image where a
# registry is reachable, or the local debootstrap image from scripts/build-base-image.sh where none is.
ARG BASE_IMAGE=python:3.11-slim

# -- stage 1: the virtualenv, installed from the wheelhouse only ------------------------------------
FROM ${BASE_IMAGE} AS venv
# (scripts/docker-build.sh removes superseded images of this stage by this label)
LABEL pagepool-emu.stage=venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1
COPY build/wheels/ /wheels/
RUN python3 -m venv /opt/emu \
 && /opt/emu/bin/python -m pip install --quiet --no-index --find-links /wheels pagepool-emu \
 && /opt/emu/bin/python -m pip uninstall --quiet --yes pip setuptools \
 && /opt/emu/bin/python -c "import dpkt, msgpack, numpy, yaml, zmq, emu.cli, emu.run.coordinator, emu.cluster.hostagent, emu.topology.file, workers; assert zmq.has('curve')" \
 && /opt/emu/bin/emu --help >/dev/null

# -- stage 2: the runtime image (no wheelhouse, no pip) ---------------------------------------------
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="pagepool-emu" \
      org.opencontainers.image.description="Multi-process emulator of XDP forwarding over a per-CPU page pool" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# An unprivileged user; /dev/shm stays a world-writable tmpfs (size it with shm_size / --shm-size),
# /run/emu holds the status file the compose healthchecks read, /srv/emu is the working directory.
RUN groupadd --gid 10001 emu \
 && useradd --uid 10001 --gid emu --create-home --home-dir /home/emu --shell /bin/bash emu \
 && install -d -o emu -g emu -m 0755 /run/emu /srv/emu

COPY --from=venv /opt/emu /opt/emu
COPY topology/ /srv/emu/topology/

ENV PATH=/opt/emu/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin} \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
WORKDIR /srv/emu
USER emu
CMD ["emu", "--help"]
