"""Where a job's paths live: the one place a URI becomes a pyarrow file system (docs/object-stores.md, "Object stores").

    fs, path = filesystem_for("s3://bucket/out", config.storage)

``s3://`` gets a ``pyarrow.fs.S3FileSystem`` built from the job's ``storage`` section: its endpoint
override (an S3-compatible store; else ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``), region,
timeouts and retry attempts (the AWS SDK's standard strategy: throttling, 5xx, resets and timeouts are
retried with exponential backoff). Credentials are never passed here: the SDK finds them where users
already keep them (AWS environment variables, profiles and ~/.aws files, instance roles), so a pickled
file system sent to a Ray task carries none of them. Every other URI (local paths, ``gs://``,
``hdfs://``) goes through ``pyarrow.fs.FileSystem.from_uri``.

File systems are cached per process and settings, so the SDK's connection pool is reused across calls.
``use(storage)`` sets the settings later calls without an explicit one get in this process: the driver
sets them once per job, and each Ray task or actor that touches storage sets them from the config it
carries.

It sits on the lowest floor, beside the ``storage`` settings it reads, so the CPU stage's media fetches
(``actors``), the engines' remote adapter copies and the driver's readers and writers (``pipelines``) share
it without any floor importing one above it.
"""

from __future__ import annotations

import functools
import os

import pyarrow.fs as pafs

from schemas.errors import JobError
from schemas.job import StorageConfig
from schemas.redact import redact

_current = StorageConfig()


def use(storage: StorageConfig | None) -> None:
    """The storage settings of the job this process works for (default for ``filesystem_for``)."""
    global _current
    _current = storage or StorageConfig()


def current() -> StorageConfig:
    return _current


def is_object_store(fs: pafs.FileSystem) -> bool:
    """True where a file is visible only once whole and there is no rename (an upload, not a file)."""
    return not isinstance(fs, pafs.LocalFileSystem)


def filesystem_for(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The file system holding ``uri`` and the path within it."""
    storage = storage or _current
    if uri.lower().startswith("s3://"):
        rest = uri[len("s3://") :]
        if "?" in rest or "@" in rest.split("/", 1)[0]:
            raise JobError(
                f"{redact(uri)}: options or credentials in an s3:// URI are not accepted (they would be "
                "logged and written to the run summary). Try storage.s3_endpoint / storage.s3_region in the "
                "config and the AWS environment variables or ~/.aws/credentials for credentials."
            )
        # FileSystem.from_uri reads the endpoint variables; a constructed S3FileSystem does not
        endpoint = storage.s3_endpoint or _env_endpoint()
        region = storage.s3_region or _env_region()
        if region is None and not endpoint:
            region = _bucket_region(rest.split("/", 1)[0])  # as FileSystem.from_uri does for s3://
        key = (endpoint, region, storage.connect_timeout_s, storage.request_timeout_s,
               storage.max_attempts)  # fmt: skip
        return _s3(*key), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


Location = tuple[str, tuple[str, ...]]  # a store and a path's segments: see ``location``


def location(uri: str) -> Location:
    """Where ``uri`` points, to compare two paths: its store (``local``, ``s3``, ...) and its path's
    segments. A local path (or ``file://`` URL) is made absolute with its symbolic links resolved; on an
    object store, bucket and key prefix as given. Trailing and repeated slashes do not count."""
    if "://" in uri and not uri.lower().startswith("file://"):
        fs, path = filesystem_for(uri)
        return fs.type_name, tuple(p for p in path.split("/") if p)
    path = pafs.FileSystem.from_uri(uri)[1] if "://" in uri else uri
    return "local", tuple(p for p in os.path.realpath(path).split("/") if p)


def within(inner: Location, outer: Location) -> bool:
    """True when the ``location`` ``inner`` is ``outer`` or lies below it."""
    return inner[0] == outer[0] and inner[1][: len(outer[1])] == outer[1]


def unreachable(key: str, uri: str, error: OSError) -> JobError:
    """The job error for a store that answered ``key``'s path with an error, or never answered."""
    return JobError(
        f"{key} {redact(uri)} cannot be reached ({error}). Try checking storage.s3_endpoint and "
        "storage.s3_region, and the credentials in the AWS environment variables or ~/.aws files."
    )


def unwritable(uri: str, error: OSError) -> JobError:
    """The job error for an output the job cannot write (checked before anything is written)."""
    where = (
        "a directory this user can create and write (not under /proc or /sys)"
        if "://" not in uri or uri.lower().startswith("file://")
        else "a bucket that exists and credentials that may write and delete objects in it"
    )
    return JobError(
        f"output.path {redact(uri)} cannot be written ({error}). Try {where}, or another output.path "
        "(CLI: --output)."
    )


def _env_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _env_endpoint() -> str | None:
    """The endpoint the AWS environment names for S3 (``storage.s3_endpoint`` wins over it)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None  # the SDK's default; a wrong region then fails the first request with its reason


@functools.lru_cache(maxsize=8)
def _s3(endpoint, region, connect_timeout_s, request_timeout_s, max_attempts) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        region=region or ("us-east-1" if endpoint else None),
        connect_timeout=connect_timeout_s,
        request_timeout=request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    )
