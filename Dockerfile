# Image for the agent nodes of compose.yaml: the library plus the reference agents in agents/.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY agents ./agents
COPY config ./config
RUN pip install -e .

# `coordinator node --agent agents.counter:Counter` imports agents/ from the working directory.
STOPSIGNAL SIGTERM
CMD ["coordinator", "--help"]
