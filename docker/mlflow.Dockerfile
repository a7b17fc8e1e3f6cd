# syntax=docker/dockerfile:1
# The team MLflow server: the official image plus the Postgres driver (backend store), boto3
# (artifacts in MinIO/S3) and Flask-WTF (mlflow[auth]: the basic-auth app does not start without
# it). Built by docker/compose.yaml (context: docker/, nothing is copied):
#   docker build -f docker/mlflow.Dockerfile -t slotsweep-mlflow:latest docker
FROM ghcr.io/mlflow/mlflow:v3.17.2

LABEL org.opencontainers.image.title="slotsweep-mlflow"

RUN pip install --no-cache-dir psycopg2-binary boto3 "Flask-WTF<2"
