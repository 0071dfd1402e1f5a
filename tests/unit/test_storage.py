"""Where s3:// settings come from besides the job's ``storage`` section: the endpoint variables of the AWS
environment, as the AWS CLI and SDKs read them (tests/s3_server.py, or PHI4MM_TEST_S3_ENDPOINT)."""

import pytest

from schemas import storage
from schemas.job import StorageConfig


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_the_endpoint_may_come_from_the_aws_environment(s3, monkeypatch, variable):
    s3.put("in/x.bin", b"hello")
    monkeypatch.setenv(variable, s3.endpoint)
    fs, path = storage.filesystem_for(s3.url("in/x.bin"), StorageConfig())
    assert fs.open_input_stream(path).read() == b"hello"


def test_the_config_endpoint_wins_over_the_environment(s3, monkeypatch):
    s3.put("in/x.bin", b"hello")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    fs, path = storage.filesystem_for(s3.url("in/x.bin"), StorageConfig(s3_endpoint=s3.endpoint))
    assert fs.open_input_stream(path).read() == b"hello"


def test_an_endpoints_region_comes_from_the_config_then_the_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-3")  # a store set up with its own region signs with it
    fs, _ = storage.filesystem_for(s3.url("x"), StorageConfig(s3_endpoint=s3.endpoint))
    assert fs.region == "eu-west-3"
    fs, _ = storage.filesystem_for(s3.url("x"), StorageConfig(s3_endpoint=s3.endpoint, s3_region="ap-east-1"))
    assert fs.region == "ap-east-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert (
        storage.filesystem_for(s3.url("x"), StorageConfig(s3_endpoint=s3.endpoint))[0].region == "us-east-1"
    )
