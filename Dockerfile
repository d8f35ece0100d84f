# The flowledger image docker-compose.yml runs (serve, agent, the demo's webhook receiver).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flowledger ./flowledger
COPY domain ./domain
COPY services ./services
COPY projections ./projections
COPY adapters ./adapters
COPY examples ./examples
RUN pip install --no-cache-dir . && useradd --create-home flowledger
USER flowledger
ENV FLOWLEDGER_HOME=/home/flowledger/.flowledger
EXPOSE 8080
CMD ["flowledger", "serve", "--host", "0.0.0.0", "--port", "8080"]
