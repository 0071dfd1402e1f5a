"""What a row's media path may reach, and how much of it is read: the trust boundary between untrusted
rows and the machine (docs/security.md, "Security: rows are untrusted").

A path is decided from its text and the config alone, before anything is opened:
1. ``::`` anywhere is refused: fsspec chains (``simplecache::http://...``) reach any protocol.
2. A URL's protocol must be in ``input.remote_protocols`` (http/https only with ``input.allow_http``);
   ``file://`` is a local path. A URL must not hold ``.`` or ``..`` segments and must lie under
   ``input.media_root`` or an ``input.allowed_media_roots`` prefix.
3. A relative local path is joined to ``media_root`` and must stay inside it (no ``..`` escape). A local
   path's symlinks are resolved and the target must lie inside ``media_root`` or an allowed directory.
Every refusal is ``MEDIA_PATH_REFUSED``, with a message made from the path's text only: whether a refused
file exists never changes the answer (``realpath`` resolves links whether or not their target exists).

Only then is the file system asked: a missing file is ``MEDIA_NOT_FOUND``; anything but a regular file
(FIFO, device, socket, directory) is refused before it is opened, so a FIFO never blocks and a device is
never read; the open uses ``O_NONBLOCK | O_NOFOLLOW`` and the type is checked again on the open file, in
case the path was swapped in between; at most ``media.max_media_bytes`` + 1 bytes are read
(``MEDIA_TOO_LARGE`` past the cap), so a huge or endless file is never read whole. URLs are read by
``actors.media.fetch`` (time limits, retries, the cap while streaming, redirects checked here again).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import unquote

from actors.media.fetch import RemoteFetcher
from actors.media.limits import check_media_size
from schemas.job import InputConfig, MediaConfig, StorageConfig
from schemas.rows import ErrorCode, RowError

# the config's defaults (schemas/job.py states them once), for a MediaSource made without a config
DEFAULT_REMOTE_PROTOCOLS = tuple(InputConfig.model_fields["remote_protocols"].default_factory())
DEFAULT_MAX_MEDIA_BYTES = MediaConfig.model_fields["max_media_bytes"].default
DEFAULT_REMOTE_TIMEOUT_S = MediaConfig.model_fields["remote_timeout_s"].default
DEFAULT_REMOTE_ATTEMPTS = MediaConfig.model_fields["remote_attempts"].default
DEFAULT_REMOTE_CONCURRENCY = MediaConfig.model_fields["remote_concurrency"].default
HTTP_PROTOCOLS = ("http", "https")


@dataclass(frozen=True)
class MediaSource:
    """Where a row's media may come from, and how much of it may be read (see the module docstring)."""

    media_root: str | None = None  # local directory or URL prefix; relative paths start there
    allow_http: bool = False
    allowed_roots: tuple[str, ...] = ()  # extra local directories or URL prefixes rows may reach
    remote_protocols: tuple[str, ...] = DEFAULT_REMOTE_PROTOCOLS
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S
    remote_attempts: int = DEFAULT_REMOTE_ATTEMPTS
    remote_concurrency: int = DEFAULT_REMOTE_CONCURRENCY
    storage: StorageConfig | None = field(default=None, compare=False)  # s3:// endpoint, region

    @cached_property
    def fetcher(self) -> RemoteFetcher:
        """Reads remote URLs for this source (``actors.media.fetch``), redirects checked by the policy."""
        return RemoteFetcher(
            self.max_bytes,
            timeout_s=self.remote_timeout_s,
            attempts=self.remote_attempts,
            concurrency=self.remote_concurrency,
            storage=self.storage,
            check_url=lambda url, shown, kind: _check_url(url, self, kind, shown=shown),
        )

    @cached_property
    def protocols(self) -> frozenset[str]:
        extra = HTTP_PROTOCOLS if self.allow_http else ()
        return frozenset(p.lower() for p in (*self.remote_protocols, *extra))

    @cached_property
    def local_roots(self) -> tuple[str, ...]:
        """Every allowed local directory, symlinks resolved once (a root may itself be a link)."""
        roots = [as_local(r) for r in (self.media_root, *self.allowed_roots) if r]
        return tuple(os.path.realpath(r) for r in roots if r is not None)

    @cached_property
    def url_roots(self) -> tuple[str, ...]:
        return tuple(_normal_url(r) for r in (self.media_root, *self.allowed_roots) if r and _is_url(r))


@dataclass(frozen=True)
class MediaTarget:
    """An allowed place to read: a local path with its symlinks resolved, or a URL."""

    location: str
    is_local: bool


def scheme_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def _is_url(path: str) -> bool:
    return bool(scheme_of(path)) and scheme_of(path) != "file"


def as_local(path: str) -> str | None:
    """A local path for a plain path or a ``file://`` URL; None for a remote URL or ``file://host/...``."""
    if scheme_of(path) == "file":
        rest = path[len("file://") :]
        return rest if rest.startswith("/") else None
    return None if scheme_of(path) else path


def _normal_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme.lower()}://{rest}"


def _inside(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it; a sibling that shares a prefix (``/data-x``) is not."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_media_path(path: str, source: MediaSource, kind: str) -> MediaTarget:
    """Decide whether a row may read ``path``: its target, or ``RowError(MEDIA_PATH_REFUSED)``. Opens
    nothing; for local paths it resolves symlinks (``realpath``), whose answer does not depend on whether
    the final target exists."""
    if "::" in path:
        raise _refused(
            kind,
            path,
            "chains fsspec URLs with '::', which rows may not do (a chain reaches any protocol). "
            "Try a plain path or URL",
        )
    if "\x00" in path or not _encodable(path):
        raise _refused(kind, path, "is not a valid path (a NUL byte or undecodable text). Try a plain path")
    if _is_url(path):
        return MediaTarget(_check_url(path, source, kind), is_local=False)
    local = as_local(path)
    if local is None:  # file://host/...: another machine's file
        raise _outside(kind, path)
    if not os.path.isabs(local):
        root = source.media_root
        if root and _is_url(root):  # relative to a remote root: a URL like any other
            return MediaTarget(_check_url(f"{root.rstrip('/')}/{local}", source, kind, shown=path), False)
        root = as_local(root) if root else None
        if not root:
            raise _outside(kind, path)
        root = os.path.abspath(root)
        local = os.path.normpath(os.path.join(root, local))
        if not _inside(local, root):  # a `..` escape, refused before any file system call
            raise _outside(kind, path)
    real = os.path.realpath(local)
    if not any(_inside(real, r) for r in source.local_roots):
        raise _outside(kind, path, _folder_to_allow(path, source))
    return MediaTarget(real, is_local=True)


def _encodable(path: str) -> bool:
    try:
        os.fsencode(path)
    except UnicodeError:
        return False
    return True


def _check_url(url: str, source: MediaSource, kind: str, shown: str | None = None) -> str:
    shown = shown or url
    scheme = scheme_of(url)
    if scheme not in source.protocols:
        if scheme in HTTP_PROTOCOLS:
            hint = "fetching over HTTP is off. Try input.allow_http: true with the URL's prefix in input.allowed_media_roots"
        else:
            allowed = ", ".join(sorted(source.protocols)) or "none"
            hint = f"rows may use only {allowed}. Try adding it to input.remote_protocols if every row may"
        raise _refused(kind, shown, f"uses protocol {scheme!r}, and {hint}, or store the bytes in the column")
    rest = unquote(url.split("://", 1)[1]).replace("\\", "/")
    if any(part in (".", "..") for part in rest.split("/")):  # servers normalise them: an escape
        raise _refused(kind, shown, "has '.' or '..' segments. Try the URL without them")
    url = _normal_url(url)
    if not any(_inside(url, root) for root in source.url_roots):
        raise _outside(kind, shown)
    return url


def _refused(kind: str, path: str, why: str) -> RowError:
    return RowError(ErrorCode.MEDIA_PATH_REFUSED, f"{kind} path {path!r} {why}.")


def _folder_to_allow(path: str, source: MediaSource) -> str | None:
    """The directory ``input.allowed_media_roots`` would need for an absolute local ``path``, from its text
    alone: part of the row's own path, the same whether the file exists or not. None for a relative path,
    for a file at the top (never suggest "/"), and for one whose directory is already allowed (a symlink
    that leads out: listing it would not help)."""
    local = as_local(path)
    if local is None or not os.path.isabs(local):
        return None
    folder = os.path.dirname(os.path.normpath(local))
    given = (as_local(r) for r in (source.media_root, *source.allowed_roots) if r)
    roots = (*source.local_roots, *(os.path.abspath(r) for r in given if r))
    return None if folder == "/" or any(_inside(folder, r) for r in roots) else folder


def _outside(kind: str, path: str, folder: str | None = None) -> RowError:
    # The same words for a file that exists and one that does not: no existence oracle. ``folder``: the
    # directory that would allow it (``_folder_to_allow``, from the path's text).
    if folder:
        return _refused(
            kind,
            path,
            "is outside what rows may read (input.media_root and input.allowed_media_roots). Try "
            f"input.allowed_media_roots: [{folder!r}] (if every row may read that directory), storing the "
            "bytes in the column, or moving the file under input.media_root",
        )
    return _refused(
        kind,
        path,
        "is outside what rows may read (input.media_root and input.allowed_media_roots). Try storing "
        "the bytes in the column, moving the file under input.media_root, or, if every row may read "
        "there, adding its directory or URL prefix to input.allowed_media_roots",
    )


def read_media_path(path: str, source: MediaSource, kind: str) -> bytes:
    """The bytes of an allowed media path, at most ``source.max_bytes`` of them (see the module docstring)."""
    target = resolve_media_path(path, source, kind)
    if target.is_local:
        return _read_local(target.location, path, source.max_bytes, kind)
    return source.fetcher.fetch(target.location, path, kind)


_FILE_TYPES = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _require_regular(mode: int, path: str, kind: str) -> None:
    if stat.S_ISLNK(mode):  # realpath left none: the path was swapped for a link since
        raise _outside(kind, path)
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _FILE_TYPES if test(mode)), "special file")
        raise _refused(
            kind, path, f"is a {what}, not a regular file; only regular files are read. Try a file's path"
        )


def _bounded_read(f, max_bytes: int, kind: str, where: str) -> bytes:
    data = f.read(max_bytes + 1)  # one byte past the cap tells "too large" without reading the rest
    check_media_size(len(data), max_bytes, kind, where, exact=False)
    return data


def _not_found(kind: str, path: str, e: Exception) -> RowError:
    return RowError(
        ErrorCode.MEDIA_NOT_FOUND,
        f"{kind} file {path!r} could not be read ({type(e).__name__}). "
        "Check the path, or set input.media_root to the directory relative paths start from.",
    )


def _read_local(real: str, path: str, max_bytes: int, kind: str) -> bytes:
    try:
        info = os.lstat(real)  # realpath resolved every link: lstat sees the file itself
    except (OSError, ValueError) as e:
        raise _not_found(kind, path, e) from e
    _require_regular(info.st_mode, path, kind)  # before open: opening a FIFO or device can block or act
    check_media_size(info.st_size, max_bytes, kind, repr(path))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: a FIFO swapped in since lstat still cannot block
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW: swapped for a symlink since realpath
            raise _outside(kind, path) from e
        raise _not_found(kind, path, e) from e
    with os.fdopen(fd, "rb") as f:
        _require_regular(os.fstat(f.fileno()).st_mode, path, kind)
        return _bounded_read(f, max_bytes, kind, repr(path))
