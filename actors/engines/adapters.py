"""Where each adapter a job applies lives on this node: the checkpoint's own vision-lora/ and speech-lora/,
the job's local folders (``model.adapters``), or a remote folder copied once per node into
``model.adapters.cache_dir``.

    dirs = resolve_adapters(config.model)   # {"vision": Path, "speech": Path}, local folders
    rank = lora_rank_of(dirs)               # the engine's max_lora_rank

A remote folder is listed, its names and sizes checked (``schemas.adapters.check_files``: nothing is
copied past ``max_bytes``), then copied into a fresh temporary folder beside the cache entry and renamed
into place, so a reader never sees half a copy. The entry's name is a hash of the URL and of each
object's name, size and modification time: a changed upload gets a new entry, an unchanged one is reused
by every later actor and run on the node. The job's own folders, local or copied, pass every check of
``schemas.adapters`` again here, so an engine never starts on a folder validation did not see.

Cheap to import: pyarrow only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from schemas.adapters import (
    ADAPTERS,
    CONFIG_FILE,
    check_adapter_dir,
    check_files,
    config_rank,
    engine_lora_rank,
)
from schemas.errors import JobError
from schemas.job import ModelConfig, StorageConfig
from schemas.model import PHI4MM, Adapter
from schemas.redact import redact
from schemas.storage import filesystem_for


def default_cache_dir() -> Path:
    """phi4mm-adapters-<user> under the system temp dir: one per user, as the temp dir is shared."""
    return Path(tempfile.gettempdir()) / f"phi4mm-adapters-{os.getuid()}"


def _own(cache: Path, key: str) -> None:
    """Create the cache (private to this user) or refuse one another user owns: its entries are loaded
    as the adapters, so whoever can write there chooses the weights."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    if cache.stat().st_uid != os.getuid():
        raise JobError(
            f"{key}: the adapter cache {cache} belongs to another user, who could replace the adapters in it. "
            "Try model.adapters.cache_dir with a directory of your own."
        )


def resolve_adapters(model: ModelConfig, storage: StorageConfig | None = None) -> dict[Adapter, Path]:
    """Each adapter's local folder: the job's own (checked; remote ones copied) or the checkpoint's."""
    custom, cfg = model.adapters.custom(), model.adapters
    dirs: dict[Adapter, Path] = {}
    for adapter in ADAPTERS:
        source = custom.get(adapter)
        if source is None:
            dirs[adapter] = Path(model.path) / PHI4MM.adapter_dir(adapter)
            continue
        key = f"model.adapters.{adapter}"
        local = fetch(key, source, cfg.max_bytes, cfg.cache_dir, storage) if "://" in source else Path(source)
        check_adapter_dir(key, local, cfg.max_bytes, redact(source))
        dirs[adapter] = local
    return dirs


def adapter_rank(directory: Path, key: str = "LoRA adapter") -> int:
    """The largest rank in an adapter folder's adapter_config.json, one vLLM serves (``config_rank``);
    JobError, ``key`` naming the adapter, when the file is missing or cannot be read."""
    cfg_file = directory / CONFIG_FILE
    try:
        text = cfg_file.read_text()
    except FileNotFoundError:
        raise JobError(
            f"{key} config {cfg_file} is missing. Phi-4-multimodal ships {PHI4MM.vision_lora_dir}/ and "
            f"{PHI4MM.speech_lora_dir}/ beside its weights; point model.path at the full checkpoint, "
            "or try model.use_lora: false to run the base model."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{key} {cfg_file} cannot be read ({e}). Try a PEFT LoRA folder.") from None
    return config_rank(key, str(cfg_file), text)[1]


def lora_rank_of(dirs: dict[Adapter, Path]) -> int:
    """The rank bound vLLM needs for the adapters in use, rounded up to a rank vLLM supports."""
    return engine_lora_rank(max(adapter_rank(d) for d in dirs.values()))


def fetch(
    key: str, source: str, max_bytes: int, cache_dir: str | None, storage: StorageConfig | None
) -> Path:
    """The local copy of a remote adapter folder, made once per node and version of the upload."""
    shown = redact(source)
    try:
        fs, root = filesystem_for(source, storage)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise JobError(f"{key} {shown} cannot be opened ({e}). Try a local folder or an s3:// URL.") from None
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise JobError(
            f"{key} {shown} cannot be listed ({e}). Try checking the URL, storage.s3_endpoint and the "
            "credentials in the AWS environment variables or ~/.aws files."
        ) from None
    files = {info.path[len(root) :].lstrip("/"): info for info in infos if info.type == pafs.FileType.File}
    if not files:
        raise JobError(
            f"{key} {shown} holds no files. Try the URL of the folder the adapter was uploaded to."
        )
    if bad := [n for n in files if ".." in PurePosixPath(n).parts]:
        raise JobError(f"{key} {shown} holds an object named {bad[0]!r}. Try a folder of plain file names.")
    check_files(key, shown, {name: info.size for name, info in files.items()}, max_bytes)
    version = json.dumps([source, sorted((n, i.size, i.mtime_ns) for n, i in files.items())])
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    _own(cache, key)
    final = cache / hashlib.sha256(version.encode()).hexdigest()[:32]
    if final.is_dir():
        return final
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
    try:
        for name, info in files.items():
            dest = partial / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if dest.stat().st_size != info.size:
                raise OSError(
                    f"{name} changed while it was copied ({dest.stat().st_size} of {info.size} bytes)"
                )
        os.rename(partial, final)  # atomic on one file system; fails if another process got there first
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if final.is_dir():  # another actor on this node finished the same copy first
            return final
        raise JobError(
            f"{key} {shown} could not be copied into {cache} ({e}). Try model.adapters.cache_dir."
        ) from None
    return final
