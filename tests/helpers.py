"""Helpers shared by tests (importable as tests.helpers)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "jobs" / "sample_media"


def make_config(tiny_model: str, tmp_path: Path, **sections):
    """A JobConfig for the tiny checkpoint on the CPU; keyword arguments replace whole sections' keys."""
    from schemas.job import JobConfig

    raw = {
        "input": {"path": str(tmp_path / "in.parquet"), "media_root": str(MEDIA)},
        "output": {"path": str(tmp_path / "out"), "mode": "overwrite"},
        "model": {"path": tiny_model, "load_format": "dummy"},
        "engine": {
            "dtype": "float32",
            "max_model_len": 2048,
            "max_num_seqs": 8,
            "dynamic_hd": 1,
            "enforce_eager": True,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        },
        "sampling": {"max_tokens": 8},
        "resources": {
            "io_num_cpus": 0.25,
            "preprocess": {"concurrency": 1, "batch_size": 8, "num_cpus": 0.5},
            "generate": {
                "concurrency": 1,
                "batch_size": 8,
                "num_cpus": 0.5,
                "num_gpus": 0,
                "concurrent_batches": 2,
            },
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section, {}), dict):
            raw.setdefault(section, {}).update(values)
        else:  # a top-level value such as confidence: true
            raw[section] = values
    return JobConfig.model_validate(raw)


def cuda_sections(memory: float, **engine) -> dict:
    """``make_config`` sections that run the tiny checkpoint's engine on a CUDA device (tests/gpu): bf16,
    ``memory`` its share of the GPU (the tier's engines share one GPU), one GPU per GPU actor; ``engine``
    adds engine keys."""
    return {
        "engine": {"dtype": "bfloat16", "gpu_memory_utilization": memory,
                   "env": {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}, **engine},
        "resources": {"generate": {"concurrency": 1, "batch_size": 8, "num_cpus": 1, "num_gpus": 1,
                                   "concurrent_batches": 2}},
    }  # fmt: skip


def media_table(rows: list[dict]):
    """Input rows of columns id, image, audio (media structs) and prompt as an Arrow table."""
    import pyarrow as pa

    from schemas.rows import MEDIA_STRUCT

    schema = pa.schema(
        [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def assert_adapters_apply_per_row_in_shared_steps(engine, max_steps: int) -> None:
    """Base, vision and speech rows give three different answers, and the same rows mixed in one batch
    give each its own answer again while sharing engine steps: at most ``max_steps`` for the batch (run
    apart, base and adapter rows would need twice the steps). On the CPU this needs the fix of vLLM's LoRA
    ops for adapter-less rows (actors.engines.vllm.cpu_lora); GPU kernels skip them."""
    from actors.engines.contract import EngineRequest

    prompt = "<|user|>tell me about the world<|end|><|assistant|>"
    requests = [EngineRequest(prompt=prompt, adapter=a) for a in (None, "vision", "speech")]
    base, vision, speech = (engine.generate([r])[0].text for r in requests)
    assert len({base, vision, speech}) == 3
    steps = engine.loop.stats.steps
    assert [r.text for r in engine.generate(requests * 2)] == [base, vision, speech] * 2
    assert engine.loop.stats.steps - steps <= max_steps


ADAPTER_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def write_adapter(folder: Path, weights: bytes = b"w" * 100, **config) -> Path:
    """A PEFT LoRA folder as the custom-adapter checks see it: adapter_config.json (LoRA, r=8, the LM's
    projections unless ``config`` says otherwise) and adapter_model.safetensors holding ``weights``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "target_modules": ADAPTER_TARGETS}
    (folder / "adapter_config.json").write_text(json.dumps(cfg | config))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def tiny_overrides(base, tmp_path: Path) -> dict:
    """``JobConfig.from_yaml`` overrides that run an example YAML on ``base``'s tiny sections: input and
    output under ``tmp_path`` (media from jobs/sample_media), the tiny model, engine, pools and budget."""
    return {
        "input.path": str(tmp_path / "in.parquet"),
        "input.media_root": str(MEDIA),
        "output.path": str(tmp_path / "out"),
        "model": base.model.model_dump(),
        "engine": base.engine.model_dump(),
        "resources": base.resources.model_dump(),
        "sampling.max_tokens": base.sampling.max_tokens,
    }
