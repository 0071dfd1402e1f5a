"""The job config: what to read, what to ask, which model and engine, how to schedule, where to write.

Every model has ``extra="forbid"`` so a typo in a YAML key fails at load time with the key's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from schemas.adapters import AdaptersConfig
from schemas.annotation import RepetitionConfig, StructuredConfig, check_annotation
from schemas.errors import JobError
from schemas.model import PHI4MM
from schemas.multitask import TaskSpec, check_tasks
from schemas.rows import OUTPUT_SCHEMA, ErrorCode
from schemas.sampling import (
    INT32_MAX,
    INT64_MAX,
    MaxTokens,
    RowSampling,
    Seed,
    StopStrings,
    Temperature,
    TopP,
)
from schemas.task import TaskConfig

# Config keys holding a local path, resolved against the YAML's directory (CLI values: the current one).
LOCAL_PATH_KEYS = (
    "input.path",
    "output.path",
    "model.path",
    "input.media_root",
    "engine.compile_cache_dir",
    "model.adapters.vision",
    "model.adapters.speech",
    "model.adapters.cache_dir",
)


# Upper bounds of numeric settings: every number in a config is finite (``allow_inf_nan=False``) and bounded,
# so `.inf`, `nan` or `1e300` is a config error naming the key, never an OverflowError in a stage.
DAY_S = 86_400.0  # a time limit or interval
MAX_BYTES = 2**40  # a cap on bytes, pixels or samples (1 TiB)
MAX_ACTORS = 4096  # actors in a pool, CPUs or GPUs of one actor, threads


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A config's YAML (a file or a --set value) is bounded before anything walks it: its text, and its values
# with each alias counted as often as it is used, so an alias bomb (10 aliases of 10 aliases ... of a list:
# 10**8 values from a few hundred bytes) is refused in microseconds instead of hanging validation.
MAX_CONFIG_CHARS = 1_000_000
MAX_CONFIG_VALUES = 100_000


class ConfigTooLarge(yaml.YAMLError):
    """A config's YAML past ``MAX_CONFIG_CHARS`` or ``MAX_CONFIG_VALUES``, or nested past Python's stack."""


def _expanded_values(root: yaml.Node) -> int:
    """Nodes of the document with every alias expanded, counted without expanding them (each node once,
    after its children); a recursive alias raises ``ConfigTooLarge``."""
    sizes: dict[int, int] = {}
    started: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_CONFIG_VALUES:
                raise ConfigTooLarge(
                    f"expands to more than {MAX_CONFIG_VALUES:,} values (each use of an alias counts its values "
                    "again: an alias bomb?)"
                )
        elif id(node) not in sizes:
            if id(node) in started:
                raise ConfigTooLarge("holds an alias inside its own anchor (a value that contains itself)")
            started.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word: a second ``model:`` section would silently
    replace the first. This loader refuses any mapping key given twice (merge keys ``<<`` excepted), and
    any document past ``MAX_CONFIG_VALUES`` once its aliases are expanded (counted before it is built)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_values(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """YAML text as Python values, read safely (``_UniqueKeyLoader``) and bounded (``MAX_CONFIG_CHARS``,
    ``MAX_CONFIG_VALUES``); ``yaml.YAMLError`` (``ConfigTooLarge`` for the bounds) on a bad text."""
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigTooLarge(f"is longer than {MAX_CONFIG_CHARS:,} characters")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except RecursionError:  # PyYAML composes and constructs recursively, one frame per level
        raise ConfigTooLarge("nests values more deeply than Python's stack allows") from None


def _read_yaml_mapping(path: Path) -> dict:
    """The YAML file's top-level mapping; JobError (one line, file and line) for anything else."""
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_CHARS + 1)  # a larger file is refused without reading it all
    except FileNotFoundError:
        raise JobError(
            f"config file {path} does not exist. Try --config with a job YAML such as jobs/configs/demo.yaml."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"config file {path} cannot be read ({e}). Try a readable UTF-8 YAML file.") from None
    try:
        raw = load_yaml(text)
    except ConfigTooLarge as e:
        raise JobError(
            f"{path}: the YAML {e}. Try writing the config out without aliases that repeat large parts, or a "
            "smaller one."
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = ": ".join(str(x) for x in (e.context, e.problem) if x)
        raise JobError(
            f"{where}: {what}. Try fixing the YAML there (a key given twice, bad indentation or an "
            "unquoted ':' are the usual causes)."
        ) from None
    except yaml.YAMLError as e:
        raise JobError(f"{path}: not valid YAML ({e}). Try a YAML mapping of sections.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise JobError(
            f"{path}: the config is a YAML {type(raw).__name__}, not a mapping of sections. Try top-level "
            "keys input:, output:, model: ... as in jobs/configs/demo.yaml."
        )
    return raw


def _resolve_local_paths(raw: dict, path: Path) -> None:
    """Relative local paths of one config file (``LOCAL_PATH_KEYS``, ``input.allowed_media_roots``) made
    absolute against that file's directory, in place."""
    for *sections, key in (k.split(".") for k in LOCAL_PATH_KEYS):
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None  # a non-mapping: pydantic says so
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            node[key] = str((path.parent / value).resolve())
    roots = raw["input"].get("allowed_media_roots") if isinstance(raw.get("input"), dict) else None
    if isinstance(roots, list):  # local directories, like media_root, are relative to the YAML
        raw["input"]["allowed_media_roots"] = [
            str((path.parent / r).resolve())
            if isinstance(r, str) and "://" not in r and not Path(r).is_absolute()
            else r
            for r in roots
        ]


def _merge(into: dict, other: dict, origin: str, origins: dict[str, str], prefix: str = "") -> None:
    for key, value in other.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = origin
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, origin, origins, f"{dotted}.")
        else:
            into[key] = value


def read_config_files(paths: Sequence[str | Path]) -> tuple[dict, dict[str, str]]:
    """Config files merged in order, as ``--config BASE --config PROFILE`` reads them: mappings key by key
    (the later file wins), anything else (a list too) replaced whole; each file's relative paths resolved
    against its own directory first. Returns the merged mapping and, for every dotted key a file sets
    (sections included), the last file that set it."""
    merged: dict = {}
    origins: dict[str, str] = {}
    for path in paths:
        raw = _read_yaml_mapping(Path(path))
        _resolve_local_paths(raw, Path(path))
        _merge(merged, raw, str(path), origins)
    return merged, origins


# One optional input column per per-row sampling field (schemas.sampling.RowSampling), named like it.
_SamplingColumns = create_model(
    "_SamplingColumns",
    __base__=_Strict,
    **{
        name: (
            str | None,
            Field(
                name,
                description=f"Optional per-row {name} column (null cells: sampling.{name}). {f.description}",
            ),
        )
        for name, f in RowSampling.model_fields.items()
    },
)


class ColumnsConfig(_SamplingColumns):
    """Names of the input columns. Set a media or prompt column to null when the dataset has none."""

    id: str = Field(
        "id", description="Unique row id, copied to the output; used to skip done rows on resume."
    )
    image: str | None = Field(
        "image", description="Image column: struct<bytes,path>, binary, path, or a list of those."
    )
    audio: str | None = Field(
        "audio", description="Audio column: struct<bytes,path>, binary, path, or a list of those."
    )
    prompt: str | None = Field(
        "prompt", description="Per-row instruction text; rows with null use prompt.default_*."
    )
    sampling_rate: str | None = Field(
        "sampling_rate",
        description="Sampling rate (Hz) of audio given as a float array in the audio column.",
    )
    structured: str | None = Field(
        None,
        description=(
            "Optional per-row structured output (JSON text or a struct: {choice: [...]}, {json_schema: {...}} "
            "or {regex: ...}) replacing the job's `structured` for that row; null cells: the job's."
        ),
    )


class InputConfig(_Strict):
    path: str = Field(
        description="Parquet file or directory (local path or fsspec URL such as s3://bucket/dir)."
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Input column names.")
    derived_ids: bool = Field(
        False,
        description=(
            "The input has no id column: each row's id is derived from its file and row, '<file path "
            "relative to path>:<row in the file>', the output's id. Stable while the files stay as they "
            "are: rewriting or reordering a file changes its ids."
        ),
    )
    media_root: str | None = Field(
        None,
        description=(
            "Directory or URL prefix that relative media paths are resolved against (default: the input's "
            "directory). Rows are untrusted: a media path may reach only this and allowed_media_roots."
        ),
    )
    allowed_media_roots: list[str] = Field(
        default_factory=list,
        description=(
            "Places besides media_root a row's media path may reach: absolute local directories or URL "
            "prefixes (s3://bucket/dir/, https://host/dir/). Any other path is refused (MEDIA_PATH_REFUSED)."
        ),
    )
    remote_protocols: list[str] = Field(
        default_factory=lambda: ["s3", "gs", "gcs", "az", "abfs", "abfss"],
        description=(
            "URL protocols (fsspec names) a row's media path may use; allow_http adds http and https. "
            "Chained URLs ('simplecache::...') are always refused; file:// is a local path."
        ),
    )
    allow_http: bool = Field(
        False,
        description="Allow media paths that are http(s) URLs (still only under media_root or allowed_media_roots).",
    )
    limit: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Process only the first N rows (a quick run on a real cluster)."
    )

    @model_validator(mode="after")
    def _check_media_reach(self) -> InputConfig:
        for name in self.remote_protocols:
            _check_protocol_name(name)
        remote = {p.lower() for p in self.remote_protocols}
        remote |= {"http", "https"} if self.allow_http else set()
        for root in self.allowed_media_roots:
            _check_media_root(root, remote)
        return self


def _check_protocol_name(name: str) -> None:
    where = f"input.remote_protocols entry {name!r}"
    if name.lower() in ("http", "https"):
        raise ValueError(f"{where}: http(s) follows input.allow_http. Try input.allow_http: true instead.")
    if name.lower() in ("file", "local"):
        raise ValueError(
            f"{where}: local files follow input.media_root and input.allowed_media_roots. Try removing it."
        )
    if not name.replace("-", "").isalnum():
        raise ValueError(f"{where} is not a protocol name. Try a bare name such as 's3'.")


def _check_media_root(root: str, remote: set[str]) -> None:
    where = f"input.allowed_media_roots entry {root!r}"
    scheme = root.split("://", 1)[0].lower() if "://" in root else ""
    if "::" in root:
        raise ValueError(f"{where} is a chained URL. Try a plain URL.")
    if scheme and scheme != "file" and scheme not in remote:
        raise ValueError(
            f"{where} uses protocol {scheme!r}, which rows may not use. Try adding it to "
            "input.remote_protocols (http and https: input.allow_http: true)."
        )
    if not scheme and not Path(root).is_absolute():
        raise ValueError(
            f"{where} is relative. Try an absolute path or a URL prefix such as s3://bucket/dir/."
        )


class OutputConfig(_Strict):
    path: str = Field(description="Output directory for Parquet part files (local path or fsspec URL).")
    mode: Literal["resume", "overwrite", "error"] = Field(
        "resume",
        description=(
            "What to do when the output already holds rows: 'resume' skips input ids already written, "
            "'overwrite' writes a whole new output beside the old one and swaps it in only when the run is "
            "complete and audited (the old output stays readable until then), 'error' refuses to run."
        ),
    )
    rows_per_file: int = Field(
        10_000, ge=1, le=INT32_MAX, description="Upper bound on rows in one Parquet part file."
    )
    commit_every_rows: int = Field(
        1_000,
        ge=1,
        le=INT32_MAX,
        description=(
            "Commit a part file once this many output rows wait for one (a part never holds more; at most "
            "rows_per_file): a run that is killed loses at most this many rows, or commit_every_s seconds "
            "of rows, and resume carries on from the rest. Smaller: less lost on a kill, more and smaller "
            "files."
        ),
    )
    commit_every_s: float = Field(
        60.0,
        ge=1.0,
        le=DAY_S,
        description=(
            "Commit the rows waiting for a part once the oldest of them has waited this many seconds, even "
            "if fewer than commit_every_rows: bounds what a kill loses when rows come slowly. Smaller: less "
            "lost on a kill, more and smaller files."
        ),
    )
    column_names: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Output columns renamed, e.g. {text: caption}: any column of the output schema but id (resume "
            "and the audit match rows by it). Keep the names across runs into one output."
        ),
    )

    carry_columns: list[str] = Field(
        default_factory=list,
        description=(
            "Input columns copied into the output unchanged, e.g. [image] or [audio_path]: the output then "
            "reads as the input with its answers. Their datasets features are kept (a media column in "
            "datasets' layout reads back as Image / Audio). Each must exist in the input and not share a "
            "name with an output column."
        ),
    )
    retry_errors: list[str] = Field(
        default_factory=list,
        description=(
            "Error codes whose rows a resume runs again (CLI: --retry-errors CODE,...), e.g. "
            "[MEDIA_FETCH_TIMEOUT]: each such row's new result, ok or an error again, replaces the old row "
            "in one commit, so every id keeps one row. Empty: error rows stay as they are."
        ),
    )

    @field_validator("retry_errors")
    @classmethod
    def _check_retry_errors(cls, codes: list[str]) -> list[str]:
        known = [c.value for c in ErrorCode]
        if unknown := [c for c in codes if c not in known]:
            raise ValueError(
                f"{unknown[0]!r} is not an error code. Try codes of the error codes of docs/data.md, e.g. "
                "MEDIA_FETCH_TIMEOUT"
            )
        return list(dict.fromkeys(codes))

    @model_validator(mode="after")
    def _check_retry_mode(self) -> OutputConfig:
        if self.retry_errors and self.mode != "resume":
            raise ValueError(
                f"output.retry_errors runs error rows again into the output as it is, which output.mode "
                f"{self.mode!r} does not keep. Try output.mode: resume (CLI: --mode resume)."
            )
        return self

    @model_validator(mode="after")
    def _check_column_names(self) -> OutputConfig:
        renamable = [n for n in OUTPUT_SCHEMA.names if n != "id"]
        for old, new in self.column_names.items():
            if old not in renamable:
                raise ValueError(
                    f"output.column_names: {old!r} is not an output column that can be renamed. Try one of "
                    f"{', '.join(renamable)}."
                )
            if not new or new.startswith("_") or new != new.strip():
                raise ValueError(
                    f"output.column_names: {old} -> {new!r} is not a usable column name. Try a plain name "
                    "such as caption."
                )
        final = [self.column_names.get(n, n) for n in OUTPUT_SCHEMA.names]
        if clash := sorted({n for n in final if final.count(n) > 1}):
            raise ValueError(
                f"output.column_names gives two output columns the name {clash[0]!r}. Try another name."
            )
        for name in self.carry_columns:
            if name in final or self.carry_columns.count(name) > 1:
                raise ValueError(
                    f"output.carry_columns: {name!r} is already an output column name (or listed twice). Try "
                    f"renaming the output's column with output.column_names, e.g. {{{name}: model_{name}}}."
                )
        return self


class StorageConfig(_Strict):
    """How the job reaches ``s3://`` paths (input, output, media). Credentials are never set here: the AWS
    SDK's usual chain finds them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, AWS_PROFILE and
    ~/.aws/credentials, an instance or pod role), and nothing of them is logged or written out."""

    s3_endpoint: str | None = Field(
        None,
        description=(
            "Endpoint of an S3-compatible store (MinIO, Ceph, a cloud's S3 API), e.g. http://10.0.0.5:9000; "
            "default: AWS itself, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment."
        ),
    )
    s3_region: str | None = Field(
        None,
        description="Region of the buckets (default: AWS_REGION or the SDK's config; us-east-1 with s3_endpoint).",
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, le=DAY_S, description="Seconds to open a connection to the store."
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        le=DAY_S,
        description="Seconds a request may go without receiving a byte before it is retried.",
    )
    max_attempts: int = Field(
        5,
        ge=1,
        le=100,
        description=(
            "Attempts per request on transient errors (throttling, 5xx, resets, timeouts), with the AWS "
            "SDK's exponential backoff, before the request fails."
        ),
    )

    @model_validator(mode="after")
    def _check_endpoint(self) -> StorageConfig:
        endpoint = self.s3_endpoint
        if endpoint is not None and ("@" in endpoint or "?" in endpoint):
            raise ValueError(
                "storage.s3_endpoint holds '@' or '?': credentials never go in the config. Try a plain "
                "http(s)://host:port and the AWS environment variables or ~/.aws/credentials."
            )
        return self


class PromptConfig(_Strict):
    system: str | None = Field(None, description="Optional system turn put before every row's user turn.")
    default_text: str = Field(
        "Say something helpful.",
        description="Instruction for text rows whose prompt column is null or empty.",
    )
    default_image: str = Field(
        "Describe this image in one sentence.", description="Default instruction for image rows."
    )
    default_audio: str = Field(
        "Transcribe the audio clip into text.", description="Default instruction for audio-only rows."
    )
    default_image_audio: str = Field(
        "Answer the question in the audio about the image.",
        description="Default instruction for image+audio rows.",
    )


class MediaConfig(_Strict):
    max_image_pixels: int = Field(
        80_000_000,
        ge=1,
        le=MAX_BYTES,
        description="Reject images with more pixels than this before decoding (decompression bombs).",
    )
    max_image_bytes: int = Field(
        320_000_000,
        ge=1,
        le=MAX_BYTES,
        description=(
            "Reject images whose decoded size, pixels x bytes per pixel (bands x bytes per sample: 8 for a "
            "16-bit RGBA PNG), is over this, checked before decoding (IMAGE_TOO_LARGE). Default: 80 MP at 4."
        ),
    )
    max_media_bytes: int = Field(
        64 * 2**20,
        ge=1,
        le=MAX_BYTES,
        description=(
            "Reject a media item (file, object or embedded bytes) larger than this (MEDIA_TOO_LARGE). Files "
            "are read with a bounded read, so a huge or endless one is never read whole."
        ),
    )
    max_audio_samples: int = Field(
        1800 * 48_000 * 2,
        ge=1,
        le=MAX_BYTES,
        description=(
            "Reject audio whose decoded size, frames x channels, is over this, checked from its header before "
            "decoding (AUDIO_TOO_LARGE). Default: 30 min of 48 kHz stereo (660 MiB as float32)."
        ),
    )
    preprocess_timeout_s: float = Field(
        60.0,
        gt=0,
        le=DAY_S,
        description=(
            "Time limit for preparing one row in the CPU stage; a row past it becomes a PREPROCESS_TIMEOUT "
            "error row and the rest of its batch goes on."
        ),
    )
    remote_timeout_s: float = Field(
        30.0,
        gt=0,
        le=DAY_S,
        description=(
            "Seconds one attempt to fetch a remote media item (s3://, http(s)://) may take, connecting and "
            "reading included; past it the attempt counts as a transient failure (MEDIA_FETCH_TIMEOUT at the end)."
        ),
    )
    remote_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description=(
            "Attempts per remote media item on transient failures (throttling, 5xx, resets, timeouts), with "
            "exponential backoff; a missing, refused or too large item is not retried."
        ),
    )
    remote_concurrency: int = Field(
        8,
        ge=1,
        le=MAX_ACTORS,
        description=(
            "Remote media items one CPU actor fetches at once, ahead of the rows that need them, so a slow "
            "store does not leave the actor (and the GPUs after it) waiting on one item at a time."
        ),
    )
    max_audio_seconds: float = Field(
        1800.0, gt=0, le=DAY_S, description="Reject audio clips longer than this (AUDIO_TOO_LONG)."
    )
    min_audio_seconds: float = Field(
        0.025,
        gt=0,
        le=DAY_S,
        description="Reject audio shorter than this; 25 ms is one encoder window (AUDIO_TOO_SHORT).",
    )
    fast_jpeg_decode: bool = Field(
        False,
        description=(
            "Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when it will be shrunk at least that "
            "much to fit its crop grid: 2-4x less CPU on camera photos. Crops and token counts stay the same; "
            "pixels differ slightly from the checkpoint processor's full decode + resize. Off: exact."
        ),
    )
    image_over_budget: Literal["reject", "downscale"] = Field(
        "reject",
        description=(
            "When a row's image tokens push it over engine.max_model_len: 'reject' (PROMPT_TOO_LONG) or "
            "'downscale' the images until the row fits (recorded in the output's media_adjustments)."
        ),
    )
    image_aspect: Literal["reject", "pad"] = Field(
        "reject",
        description=(
            "Pictures so elongated that the checkpoint's processor refuses them (a side under 10 px once fitted "
            "to the crop grid): 'reject' (IMAGE_ASPECT_RATIO_UNSUPPORTED) or 'pad' them white on their short "
            "side, centred, just enough to fit (recorded in the output's media_adjustments)."
        ),
    )
    long_audio: Literal["single", "chunk"] = Field(
        "single",
        description=(
            "'single' sends each clip whole; 'chunk' splits audio-only rows longer than chunk_seconds into "
            "overlapping windows, transcribes each and stitches the texts in order into one output row."
        ),
    )
    chunk_seconds: float = Field(30.0, ge=1, le=DAY_S, description="Window length in 'chunk' mode.")
    chunk_overlap_seconds: float = Field(
        1.0,
        ge=0,
        le=DAY_S,
        description="Overlap between consecutive windows, so no word is cut at a boundary.",
    )

    @model_validator(mode="after")
    def _check_chunks(self) -> MediaConfig:
        if self.chunk_overlap_seconds >= self.chunk_seconds / 2:
            raise ValueError(
                f"media.chunk_overlap_seconds ({self.chunk_overlap_seconds}) must be under half of "
                f"media.chunk_seconds ({self.chunk_seconds}). Try a smaller overlap."
            )
        return self


class ModelConfig(_Strict):
    path: str = Field(
        description="Local directory of a Phi-4-multimodal checkpoint (original layout, with LoRA folders)."
    )
    name: str | None = Field(
        None, description="Name written to the output's `model` column (default: the path)."
    )
    trust_remote_code: bool = Field(
        PHI4MM.trust_remote_code,
        description="Needed by the original checkpoint (its config and processor are remote code).",
    )
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto",
        description="'dummy' initialises random weights: for the project's tiny test checkpoints only.",
    )
    use_lora: bool = Field(
        True, description="Apply vision-lora to image rows and speech-lora to audio-only rows."
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        le=max(PHI4MM.supported_lora_ranks),
        description="Override the LoRA rank bound; by default read from the adapters' adapter_config.json.",
    )
    adapters: AdaptersConfig = Field(
        default_factory=AdaptersConfig,
        description="Your own fine-tuned LoRA folders in place of the checkpoint's (docs/adapters.md, 'Your own adapters').",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_accepts(cls, rank: int | None) -> int | None:
        if rank is not None and rank not in PHI4MM.supported_lora_ranks:
            covering = [r for r in PHI4MM.supported_lora_ranks if r >= rank]
            try_rank = covering[0] if covering else PHI4MM.supported_lora_ranks[-1]
            raise ValueError(
                f"{rank} is not a rank vLLM accepts ({', '.join(map(str, PHI4MM.supported_lora_ranks))}). "
                f"Try max_lora_rank: {try_rank}, or leave it out to size it from the adapters."
            )
        return rank

    @model_validator(mode="after")
    def _check_adapters(self) -> ModelConfig:
        if self.adapters.custom() and not self.use_lora:
            key = next(iter(self.adapters.custom()))
            raise ValueError(
                f"model.adapters.{key} is set but model.use_lora is false, so no adapter would be applied. "
                "Try use_lora: true, or leave model.adapters out."
            )
        return self


class EngineConfig(_Strict):
    backend: Literal["vllm", "transformers"] = Field(
        "vllm",
        description=(
            "Engine of the GPU actors, the package actors/engines/<backend>/: 'vllm' (the original "
            "checkpoint layout; continuous batching) or 'transformers' (transformers' Phi4MultimodalForCausalLM "
            "on a transformers-format checkpoint; batched generate per adapter). The vLLM-only settings "
            "(gpu_memory_utilization, tensor_parallel_size, executor, enforce_eager, compile_cache_dir, "
            "max_num_batched_tokens) do not apply to 'transformers'."
        ),
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Model dtype.")
    max_model_len: int = Field(
        4096, ge=64, le=INT32_MAX, description="Context length: prompt tokens + max_tokens must fit."
    )
    max_num_seqs: int = Field(64, ge=1, le=65_536, description="Requests the engine batches at once.")
    max_num_batched_tokens: int | None = Field(
        None, ge=64, le=INT32_MAX, description="Token budget of one engine step."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    kv_cache_memory_gib: float | None = Field(
        None,
        gt=0,
        le=4096,
        description=(
            "GiB of KV cache per engine, set outright instead of what is left of gpu_memory_utilization after "
            "vLLM's profiling run. Set it when engines share a GPU: each one profiles while the others hold "
            "memory, so their caches come out unequal and small otherwise."
        ),
    )
    async_scheduling: bool | None = Field(
        None,
        description=(
            "vLLM's asynchronous scheduling (the next step is scheduled while the GPU runs this one); None: "
            "vLLM's default (on where the executor supports it)."
        ),
    )
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_ACTORS, description="GPUs one engine spans.")
    dynamic_hd: int = Field(
        PHI4MM.default_dynamic_hd,
        ge=1,
        le=64,
        description="Max 448x448 HD crops per image (more = more tokens).",
    )
    max_images_per_row: int = Field(
        1, ge=0, le=PHI4MM.max_placeholders, description="limit_mm_per_prompt['image']."
    )
    max_audios_per_row: int = Field(
        1, ge=0, le=PHI4MM.max_placeholders, description="limit_mm_per_prompt['audio']."
    )
    enforce_eager: bool = Field(
        False, description="Skip CUDA graphs / torch.compile (faster start; required on CPU here)."
    )
    executor: Literal["uni", "mp", "ray"] = Field(
        "uni", description="vLLM executor; 'uni' keeps the engine in the actor's own process (fastest start)."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Engine seed (vLLM seeds NumPy with it: 0 to 2**32 - 1)."
    )
    compile_cache_dir: str | None = Field(
        None,
        description=(
            "Directory for vLLM's compile caches (torch.compile, Triton, Inductor, FlashInfer). Put it on a "
            "path every GPU node shares (e.g. NFS) so later actors and runs start warm; default: vLLM's "
            "per-user caches on each node."
        ),
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the GPU actors (e.g. VLLM_CPU_KVCACHE_SPACE).",
    )
    init_hook: str | None = Field(
        None,
        description="'module:function' called in each GPU actor before the engine starts (custom patches).",
    )


class SamplingConfig(_Strict):
    """The job's sampling; a row's sampling columns override its fields (bounds: ``schemas.sampling``)."""

    max_tokens: MaxTokens = Field(
        256, description="Default completion budget; a row's max_tokens column overrides it."
    )
    temperature: Temperature = Field(0.0, description="0 = greedy.")
    top_p: TopP = Field(1.0, description="Nucleus sampling mass.")
    seed: Seed | None = Field(None, description="Sampling seed for reproducible non-greedy runs.")
    stop: StopStrings = Field(default_factory=list, description="Stop strings.")
    ignore_eos: bool = Field(False, description="Keep generating past the end token (benchmarks only).")


PoolSize = Annotated[int, Field(le=MAX_ACTORS)]


def pool_bounds(concurrency: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) actors of a pool given as N or (min, max)."""
    return concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)


class StageResources(_Strict):
    concurrency: PoolSize | tuple[PoolSize, PoolSize] = Field(
        1, description="Actor pool size, or (min, max) to autoscale."
    )
    batch_size: int = Field(16, ge=1, le=INT32_MAX, description="Rows per batch handed to one actor call.")
    num_cpus: float = Field(1.0, ge=0, le=MAX_ACTORS, description="CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, le=MAX_ACTORS, description="GPUs reserved per actor.")
    max_restarts: int = Field(
        8,
        ge=0,
        le=INT32_MAX,
        description=(
            "Times Ray restarts one actor of this pool after it dies (its batches are retried). Past that the "
            "job stops; committed output stays and output.mode: resume carries on from it."
        ),
    )
    concurrent_batches: int = Field(
        1,
        ge=1,
        le=MAX_ACTORS,
        description=(
            "Batches one actor works on at once. On GPU actors they share the engine's continuous batching, "
            "so a slow batch never idles the engine while the next one waits."
        ),
    )

    @model_validator(mode="after")
    def _check_pool(self) -> StageResources:
        lo, hi = pool_bounds(self.concurrency)
        if not 1 <= lo <= hi:
            what = f"({lo}, {hi})" if isinstance(self.concurrency, tuple) else str(lo)
            raise ValueError(f"concurrency {what} must satisfy 1 <= min <= max (a single N must be >= 1).")
        return self


class ResourcesConfig(_Strict):
    io_num_cpus: float = Field(
        1.0,
        gt=0,
        le=MAX_ACTORS,
        description=(
            "CPUs per Parquet read task (lower it on small machines so actors leave room); the output's "
            "writer actor asks for none."
        ),
    )
    preprocess: StageResources = Field(
        default_factory=lambda: StageResources(concurrency=(1, 4), batch_size=32),
        description="CPU actors that decode media and count tokens.",
    )
    generate: StageResources = Field(
        default_factory=lambda: StageResources(
            concurrency=1, batch_size=32, num_cpus=1, num_gpus=1, concurrent_batches=4
        ),
        description="GPU actors that host vLLM.",
    )
    segment_rows: int = Field(
        1_000_000,
        ge=1,
        le=INT64_MAX,
        description=(
            "Input rows per Ray Data execution: the input's files are run in segments of whole files, each "
            "ending at the first file boundary past this many rows, one after another, into the same output. "
            "Ray Data keeps every block's stats on the driver for a whole execution (~0.1 KiB per row), so this "
            "bounds the driver's memory on long runs; each segment starts its actor pools and engines again "
            "(seconds on a CPU, about a minute on a GPU with a warm compile_cache_dir)."
        ),
    )


class ProgressConfig(_Strict):
    every_s: float = Field(
        60.0,
        ge=1.0,
        le=DAY_S,
        description=(
            "Seconds between progress log lines (rows done of total, rows/s, ETA, error counts), written when "
            "stderr is not a terminal (ray job submit, cron); a terminal gets Ray Data's progress bars."
        ),
    )
    plot: bool = Field(
        True, description="Write _run-<run_id>.png beside the manifest: rows/s and tokens/s over the run."
    )


class JobConfig(_Strict):
    input: InputConfig = Field(description="What to read.")
    output: OutputConfig = Field(description="Where to write.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Instructions and defaults.")
    model: ModelConfig = Field(description="Which checkpoint.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Default sampling parameters."
    )
    media: MediaConfig = Field(default_factory=MediaConfig, description="Media decoding limits.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Actor pools.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object store endpoint, region, timeouts and retries."
    )
    progress: ProgressConfig = Field(
        default_factory=ProgressConfig, description="Progress log lines and the run's rate plot."
    )
    task: TaskConfig | None = Field(
        None,
        description=(
            "A task preset (caption, transcribe, translate, summarize_audio, vqa, ocr) or a custom template "
            "asked of every row instead of its prompt column (schemas/task.py); none: the prompt column and "
            "prompt.default_*."
        ),
    )
    tasks: dict[str, TaskSpec] | None = Field(
        None,
        description=(
            "Several tasks per row in one pass, name -> the task section's fields plus structured, max_tokens "
            "and n (schemas/multitask.py); each is an output struct column of that name. Not with task."
        ),
    )
    structured: StructuredConfig | None = Field(
        None,
        description="Constrain every answer to a JSON schema, a choice list or a regex (schemas/annotation.py).",
    )
    repetition: RepetitionConfig = Field(
        default_factory=RepetitionConfig,
        description="Stop looping answers (finish_reason 'repetition'); on by default.",
    )
    confidence: bool = Field(
        False,
        description=(
            "Score each answer: logprob_mean and logprob_min of its tokens, and with structured.choice each "
            "choice's probability (choice_probs)."
        ),
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> JobConfig:
        check_annotation(self)
        check_tasks(self)
        if self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) leaves no room for the prompt in "
                f"engine.max_model_len ({self.engine.max_model_len}). Try lowering sampling.max_tokens."
            )
        gen = self.resources.generate
        if (
            gen.num_gpus
            and self.engine.tensor_parallel_size > 1
            and gen.num_gpus != self.engine.tensor_parallel_size
        ):
            raise ValueError(
                f"resources.generate.num_gpus ({gen.num_gpus}) must equal engine.tensor_parallel_size "
                f"({self.engine.tensor_parallel_size}): one actor owns all GPUs of its engine."
            )
        if self.engine.tensor_parallel_size > 1 and self.engine.executor == "uni":
            raise ValueError(
                "engine.tensor_parallel_size > 1 needs engine.executor 'mp' or 'ray'; try executor: mp."
            )
        if self.engine.tensor_parallel_size > 1 and self.engine.executor == "ray":
            raise ValueError(
                "engine.executor 'ray' would place the engine's workers outside the actor's GPUs. "
                "Try executor: mp with resources.generate.num_gpus equal to tensor_parallel_size: the actor "
                "then holds all its engine's GPUs on one node, like a one-bundle placement group."
            )
        if (
            gen.num_gpus
            and gen.num_gpus < 1
            and self.engine.tensor_parallel_size == 1
            and gen.num_gpus * 2 > 1
        ):
            raise ValueError(
                f"resources.generate.num_gpus {gen.num_gpus} leaves less than a GPU per engine but more than "
                "half: two engines cannot share it. Try 1, or 0.5 with engine.gpu_memory_utilization <= 0.45."
            )
        if 0 < gen.num_gpus < 1 and self.engine.gpu_memory_utilization > gen.num_gpus:
            raise ValueError(
                f"engines sharing a GPU (resources.generate.num_gpus {gen.num_gpus}) must each take at most that "
                f"share of its memory; engine.gpu_memory_utilization is {self.engine.gpu_memory_utilization}. "
                f"Try gpu_memory_utilization: {gen.num_gpus * 0.9:.2f}."
            )
        if 0 < gen.num_gpus < 1 and self.engine.backend == "vllm" and self.engine.kv_cache_memory_gib is None:
            # Each engine profiles its memory while the others start, counts their allocations as its own,
            # and sizes its KV cache from what is left (on an 80 GB card: 6% and 13% of one engine's cache).
            raise ValueError(
                f"engines sharing a GPU (resources.generate.num_gpus {gen.num_gpus}) need their KV cache set "
                "outright, or each sizes it from what the others left free and holds too few requests. Try "
                "engine.kv_cache_memory_gib: the card's GiB x gpu_memory_utilization minus the model's weights "
                "and ~4 GiB of working memory (docs/gpus.md, 'Two engines on one GPU'), or num_gpus: 1."
            )
        return self

    @classmethod
    def from_yaml(
        cls,
        path: str | Path | Sequence[str | Path],
        overrides: dict | None = None,
        origins: dict | None = None,
    ) -> JobConfig:
        """Load a YAML config, or several merged in order (``read_config_files``); relative local paths in
        each are resolved against that file's directory. ``overrides`` (dotted keys) are applied last;
        ``origins``, when given, is filled with the file that set each dotted key.

        A file that is missing, not YAML, not a mapping or that repeats a key raises ``JobError`` (one line
        naming the file and line); a mapping that is not a valid config raises pydantic's ValidationError.
        """
        raw, found = read_config_files([path] if isinstance(path, (str, Path)) else path)
        if origins is not None:
            origins.update(found)
        for dotted, value in (overrides or {}).items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    node[p] = {}  # the override wins over a malformed section
                node = node[p]
            node[leaf] = value
        return cls.model_validate(raw)

    def max_tokens(self, row_max_tokens: int | None = None, task: str | None = None) -> int:
        """A request's completion budget, the one rule for it: the row's own max_tokens, else the task's
        (``tasks.<task>.max_tokens``), else the job's ``sampling.max_tokens``. With tasks and no ``task``
        named: the largest budget any task of the row may have (what decides whether its prompts fit)."""
        if row_max_tokens:
            return row_max_tokens
        job = self.sampling.max_tokens
        if task is not None:
            return self.tasks[task].max_tokens or job
        return max((t.max_tokens or job for t in (self.tasks or {}).values()), default=job)

    @property
    def model_name(self) -> str:
        return self.model.name or self.model.path
