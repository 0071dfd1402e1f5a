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
        raw.setdefault(section, {}).update(values)
    return JobConfig.model_validate(raw)
