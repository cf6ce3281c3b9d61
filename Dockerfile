# One image for the facade, the exporter and the trainer (the python models inside Triton import
# the same packages). Triton itself runs from NVIDIA's image in docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml Makefile ./
COPY common ./common
COPY client ./client
COPY api ./api
COPY export ./export
COPY training ./training
COPY serving ./serving
COPY runtime ./runtime
COPY benchmarks ./benchmarks
COPY model_repository ./model_repository
COPY data ./data
RUN make install
ENV PATH=/app/.venv/bin:$PATH HF_HUB_OFFLINE=0
EXPOSE 8080
CMD ["python", "-m", "api.app"]
