# One image for the coordinator and the servers; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
RUN pip install --no-cache-dir . && useradd --create-home bnservice && mkdir /state \
    && chown bnservice /state
USER bnservice
EXPOSE 50050 50051
# bnserver handles SIGTERM itself: drains calls, writes state, exits 0.
ENTRYPOINT ["bnserver"]
CMD ["serve", "--host", "0.0.0.0", "--state-dir", "/state"]
