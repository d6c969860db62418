# payq: one image for every role (worker, relay, migrate, provider-sim).
#   docker build -t payq:local .
#   docker run --rm -e PAYMENT_PROVIDER_API_KEY=... payq:local worker
# Configuration comes from the environment at run time (see payq/settings.py);
# nothing secret is baked into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN groupadd --system --gid 10001 payq \
 && useradd --system --uid 10001 --gid payq --home-dir /app --create-home \
        --shell /usr/sbin/nologin payq

WORKDIR /src

# Dependencies first, from pyproject alone: this layer is rebuilt only when
# pyproject.toml changes, not on every source edit. README.m[d] matches README.md
# when it exists and nothing otherwise (the build only warns without it).
COPY pyproject.toml README.m[d] ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the sources, and the project itself (non-editable; dependencies are already met).
# Only the packages are copied: no .env, no tests, no .git.
COPY payq ./payq
COPY producers ./producers
COPY workers ./workers
COPY payq_cli ./payq_cli
COPY provider_sim ./provider_sim
COPY devservices ./devservices
COPY migrations ./migrations
RUN pip install . \
 && cd / && rm -rf /src

# An empty working directory: `python -m dramatiq` (what `payq worker` runs) puts the
# working directory on sys.path, so the installed package is the one imported.
WORKDIR /app
USER 10001:10001

ENTRYPOINT ["payq"]
CMD ["--help"]
