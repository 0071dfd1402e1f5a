"""The job's own LoRA adapters (``model.adapters``) and the checks an adapter folder passes before any
engine starts (docs/adapters.md, "Your own adapters").

    check_files("model.adapters.speech", source, {"adapter_config.json": 700, ...}, max_bytes)
    info = check_adapter_dir("model.adapters.speech", Path(folder), max_bytes)  # AdapterInfo(rank, ...)

Reads a local folder's names, sizes and adapter_config.json, nothing else (a ``target_modules`` regex is
matched in a child Python, with a time limit: ``_regex_matches``); a remote adapter is
listed and fetched by ``actors.engines.adapters``, which hands the names and the local copy to these
checks. A failed check is a ``JobError`` naming the key and ending in "Try ...". No torch, vLLM or Ray.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import JobError
from schemas.model import PHI4MM, Adapter

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_ADAPTER_RANK = max(PHI4MM.supported_lora_ranks)  # the largest max_lora_rank vLLM accepts
ADAPTERS: tuple[Adapter, ...] = ("vision", "speech")

# Where a PEFT adapter's module names may start, by the object it was trained on: the checkpoint's own
# remote code wraps the inner model (layers.N...), transformers' Phi4MultimodalForCausalLM its outer one.
_MODULE_PREFIXES = ("", "model.", "model.model.", "base_model.model.model.", "language_model.model.")
# Other modules PEFT matches a target_modules regex against when it loads the adapter: the model's longest
# names, where a regex that backtracks costs the most.
_OTHER_MODULES = (
    "model.embed_tokens",
    "model.layers.31.self_attn",
    "model.layers.31.post_attention_layernorm",
    "model.embed_tokens_extend.image_embed.img_processor.encoder.layers.26.self_attn.out_proj",
    "model.embed_tokens_extend.audio_embed.encoder.encoders.23.feed_forward_out.net.0.linear",
    "base_model.model.model.embed_tokens_extend.audio_embed.audio_projection.vision.2",
    "lm_head",
)
REGEX_TIME_LIMIT_S = 5.0  # to match a target_modules regex against those names (sound ones: microseconds)
# Python's re cannot be interrupted (a thread matching holds the interpreter), so a child process matches
# and is killed at the limit; it runs with re as PEFT does, on the names above.
_MATCHER = "import json, re, sys; p, ns = json.load(sys.stdin); print(json.dumps([bool(re.fullmatch(p, n)) for n in ns]))"


class AdaptersConfig(BaseModel):
    """The job's own fine-tuned adapters in place of the checkpoint's vision-lora/ and speech-lora/."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    vision: str | None = Field(
        None,
        description=(
            "PEFT LoRA folder used instead of the checkpoint's vision-lora/ for image and image+audio rows: a "
            "local directory (relative to the YAML) or an object-store URL (s3://bucket/dir). None: the "
            "checkpoint's own."
        ),
    )
    speech: str | None = Field(
        None,
        description=(
            "PEFT LoRA folder used instead of the checkpoint's speech-lora/ for audio-only rows: a local "
            "directory (relative to the YAML) or an object-store URL. None: the checkpoint's own."
        ),
    )
    cache_dir: str | None = Field(
        None,
        description=(
            "Local directory each node copies remote adapters into, once per source and version; it must be "
            "yours, as its entries are loaded as the adapters (default: phi4mm-adapters-<uid> in the temp dir)."
        ),
    )
    max_bytes: int = Field(
        4 * 2**30,
        ge=1,
        le=2**40,
        description="Refuse an adapter folder whose files total more than this (checked before it is copied).",
    )

    def custom(self) -> dict[Adapter, str]:
        """The adapters this job replaces: name -> its folder or URL."""
        return {a: getattr(self, a) for a in ADAPTERS if getattr(self, a)}


@dataclass(frozen=True)
class AdapterInfo:
    """What the checks learnt of one adapter folder."""

    rank: int
    target_modules: tuple[str, ...] | str
    bytes: int


def engine_lora_rank(needed: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that covers an adapter of rank ``needed``."""
    for supported in PHI4MM.supported_lora_ranks:
        if supported >= needed:
            return supported
    raise ValueError(f"adapter rank {needed} exceeds the largest rank vLLM supports ({MAX_ADAPTER_RANK}).")


def _module_names() -> list[str]:
    """Full names the allowed modules of layer 0 may have in a PEFT adapter, for matching a regex."""
    return [f"{p}layers.0.{m}" for p in _MODULE_PREFIXES for m in PHI4MM.lora_layer_modules]


@functools.lru_cache(maxsize=64)
def _regex_matches(pattern: str) -> tuple[str, ...] | None:
    """The allowed module names ``pattern`` fullmatches, matched by ``re`` as PEFT does; None when matching
    it against those and ``_OTHER_MODULES`` takes more than ``REGEX_TIME_LIMIT_S`` (a pattern that
    backtracks exponentially, such as ``(.*.*)*X``, would hang validation here and the adapter's load)."""
    names = [*_module_names(), *_OTHER_MODULES]
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _MATCHER], input=json.dumps([pattern, names]),
            capture_output=True, text=True, timeout=REGEX_TIME_LIMIT_S, check=True,
        )  # fmt: skip
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
        return None
    return tuple(n for n, hit in zip(names, json.loads(done.stdout), strict=True) if hit)


def target_problem(targets) -> str | None:
    """Why ``target_modules`` is not one vLLM can apply to Phi-4-mm's language model; None when it is.

    A list names modules PEFT matches by suffix (``qkv_proj``, ``self_attn.qkv_proj``); a string is a
    regex PEFT matches against whole module names, which must match one of the allowed projections."""
    names = _module_names()
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            return f"target_modules {targets!r} is not a valid regex ({e})"
        matched = _regex_matches(targets)
        if matched is None:
            return (
                f"the target_modules regex {targets!r} takes more than {REGEX_TIME_LIMIT_S:g} s to match module "
                "names (it backtracks: nested or overlapping repeats such as (.*)*), and PEFT would take as long "
                "for each module"
            )
        if not set(matched) & set(names):
            return f"the target_modules regex {targets!r} matches none of the language model's projections"
        return None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        return f"target_modules {targets!r} is not a list of module names or a regex"
    bad = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if bad:
        return f"target_modules {bad} are not among the language model's projections"
    return None


def check_files(key: str, source: str, sizes: dict[str, int], max_bytes: int) -> int:
    """The folder's files (relative name -> bytes) hold a config and weights within ``max_bytes``; returns
    their total size."""
    if CONFIG_FILE not in sizes:
        raise JobError(
            f"{key} {source} has no {CONFIG_FILE}, so it is not a PEFT adapter folder. Try the folder "
            "PEFT's save_pretrained wrote (adapter_config.json beside adapter_model.safetensors)."
        )
    if not any(w in sizes for w in WEIGHT_FILES):
        raise JobError(
            f"{key} {source} has no adapter weights ({' or '.join(WEIGHT_FILES)}). Try the folder PEFT's "
            "save_pretrained wrote, weights included."
        )
    total = sum(sizes.values())
    if total > max_bytes:
        raise JobError(
            f"{key} {source} holds {total} bytes, over model.adapters.max_bytes ({max_bytes}). Try removing "
            "files the adapter does not need (optimizer states, checkpoints) or raising max_bytes."
        )
    return total


def config_rank(key: str, source: str, text: str) -> tuple[dict, int]:
    """adapter_config.json's text as a JSON object, and its largest rank (``r`` and ``rank_pattern``),
    which must be one vLLM serves (the checkpoint's own adapters are checked this far only)."""
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise JobError(f"{key} {source}: {CONFIG_FILE} is not JSON ({e}). Try PEFT's own file.") from None
    if not isinstance(cfg, dict):
        raise JobError(f"{key} {source}: {CONFIG_FILE} is not a JSON object. Try PEFT's own file.")
    pattern = cfg.get("rank_pattern") or {}
    ranks = [
        cfg.get("r"),
        *(pattern.values() if isinstance(pattern, dict) else [pattern]),
    ]  # vLLM's bound covers both
    if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_ADAPTER_RANK for r in ranks):
        raise JobError(
            f"{key} {source}: {CONFIG_FILE} has rank r={cfg.get('r')!r} (rank_pattern: "
            f"{cfg.get('rank_pattern') or {}}); vLLM serves LoRA ranks 1 to {MAX_ADAPTER_RANK}. Try an adapter "
            f"trained with r <= {MAX_ADAPTER_RANK}."
        )
    return cfg, max(ranks)


def check_config(key: str, source: str, text: str) -> tuple[int, tuple[str, ...] | str]:
    """adapter_config.json's text is a LoRA config vLLM can serve on Phi-4-mm: (rank, target_modules)."""
    cfg, rank = config_rank(key, source, text)
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise JobError(
            f"{key} {source}: {CONFIG_FILE} has peft_type {peft_type!r}, not 'LORA'; only LoRA adapters can be "
            "served. Try an adapter trained with peft.LoraConfig."
        )
    if problem := target_problem(cfg.get("target_modules")):
        raise JobError(
            f"{key} {source}: {problem}. Try target_modules among {list(PHI4MM.lora_layer_modules)} (the "
            "projections of each language-model layer, as the checkpoint's own adapters target)."
        )
    if (
        cfg.get("use_dora")
        or cfg.get("lora_bias")
        or cfg.get("bias", "none") != "none"
        or cfg.get("modules_to_save")
    ):
        raise JobError(
            f"{key} {source}: {CONFIG_FILE} sets use_dora, lora_bias, bias or modules_to_save, which vLLM "
            "cannot serve. Try a plain LoRA adapter (no DoRA, bias 'none', no modules_to_save)."
        )
    targets = cfg["target_modules"]
    return rank, targets if isinstance(targets, str) else tuple(targets)


def folder_sizes(directory: Path) -> dict[str, int]:
    """A local folder's files, relative name -> bytes."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()
    }


def check_adapter_dir(key: str, directory: Path, max_bytes: int, source: str | None = None) -> AdapterInfo:
    """Every check of one local adapter folder (``source``: where it came from, for messages)."""
    shown = source or str(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise JobError(f"{key} {shown} {what}. Try the folder PEFT's save_pretrained wrote, or an s3:// URL.")
    total = check_files(key, shown, folder_sizes(directory), max_bytes)
    try:
        text = (directory / CONFIG_FILE).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{key} {shown}: {CONFIG_FILE} cannot be read ({e}). Try a readable file.") from None
    rank, targets = check_config(key, shown, text)
    return AdapterInfo(rank=rank, target_modules=targets, bytes=total)
