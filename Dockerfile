# One image for the coordinator and the servers; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
# A fixed uid, so that Kubernetes' runAsUser/fsGroup (deploy/kubernetes) match it.
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 bnservice && mkdir /state \
    && chown bnservice /state
USER bnservice
# gRPC (coordinator 50050, server 50051) and --metrics-port (9100 in deploy/kubernetes).
EXPOSE 50050 50051 9100
# bnserver handles SIGTERM itself: drains calls, writes state, exits 0.
ENTRYPOINT ["bnserver"]
CMD ["serve", "--host", "0.0.0.0", "--state-dir", "/state"]
