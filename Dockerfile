# The CDS Hooks service as a container image.
#   docker build -t cds-hooks-service .
#   docker run -p 8000:8000 -e CDS_JWT_ISSUERS=/config/issuers.json -v ./config:/config:ro cds-hooks-service
# Site rules: `cds-hooks-service init /site` (or copy rules/ and cards/), then mount them and point at them:
#   -v ./site:/site:ro -e CDS_RULES_DIR=/site/rules
# Stage 1 builds the wheel (scripts/build-wheel.sh); stage 2 installs it with the locked runtime dependencies
# (scripts/install-service.sh, the same steps as tests/test_wheel.py) and runs the Procfile's command.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md LICENSE gunicorn.conf.py ./
COPY cds_hooks_service/ cds_hooks_service/
COPY rules/ rules/
COPY cards/ cards/
COPY scripts/ scripts/
RUN PYTHON=python bash scripts/build-wheel.sh /dist

FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 PORT=8000 CDS_REQUIRE_JWT=1 \
    CDS_INSTANCE_DIR=/var/lib/cds-hooks-service
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin cds \
    && mkdir -p /var/lib/cds-hooks-service \
    && chown cds /var/lib/cds-hooks-service
WORKDIR /app
COPY requirements/runtime.txt requirements/runtime.txt
COPY scripts/install-service.sh scripts/install-service.sh
COPY --from=build /dist/ /dist/
RUN PYTHON=python bash scripts/install-service.sh /opt/venv /dist/cds_hooks_service-*.whl && rm -rf /dist
COPY gunicorn.conf.py Procfile ./
USER 10001
EXPOSE 8000
VOLUME ["/var/lib/cds-hooks-service"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/livez', timeout=2)"]
# The Procfile's command (tests/test_container.py keeps them the same).
CMD ["gunicorn", "--config", "gunicorn.conf.py", "cds_hooks_service:create_app()"]
