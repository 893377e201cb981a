"""Fixtures shared by tests/engines: the real S3 API server (see moto_s3.py)."""

from moto_s3 import aws_env, bucket, s3_endpoint  # noqa: F401
