"""A real S3 server on loopback for tests: moto's server mode (a werkzeug HTTP server speaking the
S3 protocol, in a thread of the test process), never an in-process patch of the client.

    with s3_server() as endpoint:       "http://127.0.0.1:<free port>", AWS_* env set to dummies
        client = s3_client(endpoint)
        client.create_bucket(Bucket="adapters")
        upload_adapter(client, "adapters", "prefix/", "lora-a", adapter_dir)

Other processes (Ray replicas) reach it over the same port, with the same environment.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: dummy credentials moto accepts; exported so boto3 in child processes finds them too
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server():
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_bucket(bucket: str):
    """`s3_server()` with `bucket` created in it: yields the endpoint."""
    with s3_server() as url:
        s3_client(url).create_bucket(Bucket=bucket)
        yield url


def s3_client(endpoint: str):
    from runtime.adapters.s3_store import make_client

    return make_client(endpoint)


def upload_adapter(client, bucket: str, prefix: str, adapter_id: str, src: Path,
                   names=("adapter_model.safetensors", "adapter_config.json")) -> None:
    """Put the files of a PEFT directory under <prefix><id>/ (as `aws s3 cp --recursive` would)."""
    for name in names:
        client.upload_file(str(Path(src) / name), bucket, f"{prefix}{adapter_id}/{name}")
