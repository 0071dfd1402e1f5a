"""Where s3:// settings come from besides the job's ``storage`` section: the endpoint variables of the AWS
environment, as the AWS CLI and SDKs read them (tests/s3_server.py, or PHI4MM_TEST_S3_ENDPOINT)."""

import pytest

from pipelines import storage
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
