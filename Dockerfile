# The extauthz image: `make image` builds it (docs/operations.md, "The container image").
# One image for the server (`extauthz serve`, the default command), the spend ledger's sink
# (`extauthz ledger run`, `extauthz ledger migrate`) and the admin CLI (`vkeys`).
#
# Two stages on the same slim Python base. The builder compiles protos/keys/v1 with
# grpcio-tools (the generated stubs are not in git) and installs the project, not editable,
# into the virtualenv /opt/venv. The final stage copies only that virtualenv: no compiler,
# no grpcio-tools, no pip cache, no sources or tests.

FROM python:3.11-slim-bookworm AS builder

# Pinned for a repeatable build (the project's own dependencies resolve within
# pyproject.toml's ranges at build time; there is no lock file). grpcio-tools requires
# grpcio and protobuf at least as new as the code it generates, so installing it into the
# project's virtualenv keeps the generated stubs and the runtime in step.
ARG GRPCIO_TOOLS_VERSION=1.85.1
ARG GOOGLEAPIS_COMMON_PROTOS_VERSION=1.76.0

# pip compiles the installed modules to bytecode here, so the final image, whose root
# filesystem may be read-only, never needs to.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
    && pip install --no-cache-dir \
        "grpcio-tools==${GRPCIO_TOOLS_VERSION}" \
        "googleapis-common-protos==${GOOGLEAPIS_COMMON_PROTOS_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY extauthz/ extauthz/
COPY keys/ keys/
COPY ledger/ ledger/
COPY vkeys/ vkeys/
COPY devstack/ devstack/

# As the Makefile's protos target, less the type stubs and Envoy's descriptor set, which
# the running server does not read.
RUN GOOGLE_PROTOS="$(python -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parent.parent)')" \
    && python -m grpc_tools.protoc -I protos -I "${GOOGLE_PROTOS}" \
        --python_out=. --grpc_python_out=. protos/keys/v1/*.proto \
    && touch keys/v1/py.typed

# Not editable: the package lands in site-packages and /src is left behind with this stage.
# grpcio-tools goes once the stubs exist; the import below fails the build if the stubs
# and the installed grpcio/protobuf do not fit.
RUN pip install --no-cache-dir . \
    && pip uninstall --yes grpcio-tools \
    && python -c "import extauthz.server, keys.v1.keys_pb2_grpc, ledger.cli, vkeys" \
    && extauthz serve --help > /dev/null


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="extauthz" \
      org.opencontainers.image.description="Envoy ext_authz / nginx auth_request server for virtual LLM API keys, backed by Redis" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, numeric, non-root user: the Kubernetes manifests run as 10001:10001, and a pod
# with only `runAsNonRoot: true` (the ledger's) is admitted because USER is numeric.
RUN groupadd --system --gid 10001 extauthz \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /var/lib/extauthz --no-create-home --shell /usr/sbin/nologin extauthz \
    && mkdir -p /var/lib/extauthz/journal \
    && chown -R 10001:10001 /var/lib/extauthz

COPY --from=builder /opt/venv /opt/venv

# EXTAUTHZ_JOURNAL_DIR: where usage reports wait while Redis is unreachable (the path the
# manifests mount an emptyDir on). It is writable by the user above without a volume; mount
# one there (-v extauthz-journal:/var/lib/extauthz/journal) to keep the journal across
# containers, and always with a read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EXTAUTHZ_JOURNAL_DIR=/var/lib/extauthz/journal

WORKDIR /var/lib/extauthz
USER 10001:10001

# 9191: gRPC (ext_authz Check, the usage tap, KeyService, UsageService, BudgetService,
# grpc.health.v1). 9192: HTTP (/metrics, /healthz, /readyz, /auth). The ledger's sink
# serves its metrics on LEDGER_METRICS_PORT (9193) instead.
EXPOSE 9191 9192

# The readiness check the Kubernetes manifests run (a kubelet `grpc:` probe on 9191):
# grpc.health.v1 Check, service "", through the image's own grpcio. Unhealthy while Redis
# is unreachable or the server drains, as readiness should be. Kubernetes ignores
# HEALTHCHECK and probes by itself. Run other commands from this image (`ledger run`,
# `vkeys`) with --no-healthcheck. With TLS on the gRPC port this plaintext check fails,
# as kubelet gRPC probes do: probe GET /readyz on 9192 instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('EXTAUTHZ_GRPC_PORT', '9191')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]

# `docker run IMAGE` serves; `docker run IMAGE ledger run` runs the ledger's sink. In
# Kubernetes, `command: [extauthz, ...]` replaces both.
ENTRYPOINT ["extauthz"]
CMD ["serve"]
