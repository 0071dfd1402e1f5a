"""The job config: what to read, what to ask, which model and engine, how to schedule, where to write.

Every model has ``extra="forbid"`` so a typo in a YAML key fails at load time with the key's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.model import PHI4MM


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(_Strict):
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
    max_tokens: str | None = Field("max_tokens", description="Optional per-row max_tokens override column.")
    temperature: str | None = Field(
        "temperature", description="Optional per-row temperature override column."
    )
    top_p: str | None = Field("top_p", description="Optional per-row top_p override column.")
    seed: str | None = Field("seed", description="Optional per-row sampling seed column.")
    stop: str | None = Field("stop", description="Optional per-row stop strings column (string or list).")
    sampling_rate: str | None = Field(
        "sampling_rate",
        description="Sampling rate (Hz) of audio given as a float array in the audio column.",
    )


class InputConfig(_Strict):
    path: str = Field(
        description="Parquet file or directory (local path or fsspec URL such as s3://bucket/dir)."
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Input column names.")
    media_root: str | None = Field(
        None,
        description="Directory that relative media paths are resolved against (default: the input's directory).",
    )
    allow_http: bool = Field(False, description="Allow media paths that are http(s) URLs to be fetched.")
    limit: int | None = Field(
        None, ge=1, description="Process only the first N rows (a quick run on a real cluster)."
    )


class OutputConfig(_Strict):
    path: str = Field(description="Output directory for Parquet part files (local path or fsspec URL).")
    mode: Literal["resume", "overwrite", "error"] = Field(
        "resume",
        description=(
            "What to do when the output already holds rows: 'resume' skips input ids already written, "
            "'overwrite' deletes the old parts first, 'error' refuses to run."
        ),
    )
    rows_per_file: int = Field(10_000, ge=1, description="Upper bound on rows in one Parquet part file.")


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
        description="Reject images with more pixels than this before decoding (decompression bombs).",
    )
    max_audio_seconds: float = Field(
        1800.0, gt=0, description="Reject audio clips longer than this (AUDIO_TOO_LONG)."
    )
    min_audio_seconds: float = Field(
        0.025,
        gt=0,
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
    long_audio: Literal["single", "chunk"] = Field(
        "single",
        description=(
            "'single' sends each clip whole; 'chunk' splits audio-only rows longer than chunk_seconds into "
            "overlapping windows, transcribes each and stitches the texts in order into one output row."
        ),
    )
    chunk_seconds: float = Field(30.0, ge=1, description="Window length in 'chunk' mode.")
    chunk_overlap_seconds: float = Field(
        1.0, ge=0, description="Overlap between consecutive windows, so no word is cut at a boundary."
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
        description="Override the LoRA rank bound; by default read from the adapters' adapter_config.json.",
    )


class EngineConfig(_Strict):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Model dtype.")
    max_model_len: int = Field(
        4096, ge=64, description="Context length: prompt tokens + max_tokens must fit."
    )
    max_num_seqs: int = Field(64, ge=1, description="Requests the engine batches at once.")
    max_num_batched_tokens: int | None = Field(None, ge=64, description="Token budget of one engine step.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans.")
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
    seed: int = Field(0, description="Engine seed.")
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
    max_tokens: int = Field(
        256, ge=1, description="Default completion budget; a row's max_tokens column overrides it."
    )
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(None, description="Sampling seed for reproducible non-greedy runs.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    ignore_eos: bool = Field(False, description="Keep generating past the end token (benchmarks only).")


def pool_bounds(concurrency: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) actors of a pool given as N or (min, max)."""
    return concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)


class StageResources(_Strict):
    concurrency: int | tuple[int, int] = Field(1, description="Actor pool size, or (min, max) to autoscale.")
    batch_size: int = Field(16, ge=1, description="Rows per batch handed to one actor call.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor.")
    max_restarts: int = Field(
        8,
        ge=0,
        description=(
            "Times Ray restarts one actor of this pool after it dies (its batches are retried). Past that the "
            "job stops; committed output stays and output.mode: resume carries on from it."
        ),
    )
    concurrent_batches: int = Field(
        1,
        ge=1,
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
        description="CPUs per Parquet read/write task (lower it on small machines so actors leave room).",
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

    @model_validator(mode="after")
    def _check_combinations(self) -> JobConfig:
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
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> JobConfig:
        """Load a YAML config; relative local paths in it are resolved against the YAML's directory."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        for section, key in (
            ("input", "path"),
            ("output", "path"),
            ("model", "path"),
            ("input", "media_root"),
            ("engine", "compile_cache_dir"),
        ):
            value = (raw.get(section) or {}).get(key)
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                raw[section][key] = str((Path(path).parent / value).resolve())
        for dotted, value in (overrides or {}).items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.model_validate(raw)

    @property
    def model_name(self) -> str:
        return self.model.name or self.model.path
