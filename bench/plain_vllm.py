"""The plain vLLM script a user writes in ten minutes: the baseline of ``bench/gpu.py``.

Read the Parquet, decode every row (Pillow, soundfile), build Phi-4-mm prompts, one ``LLM.generate``
over all rows with the modality's LoRA adapter, write the answers. No Ray, no CPU pool, no prepared
media: vLLM runs the checkpoint's own processor on the raw images and audio.

Decoding every row first holds every decoded picture and clip at once (+23 GiB per 1,000 rows of the
GPU benchmark's mix), more than a host has at 10,000 rows. With ``chunk_rows`` it is the loop a user
writes for that: start the engine, then read, decode and generate ``chunk_rows`` rows at a time.

It takes the benchmark's job config so that both sides use the same engine settings, sampling and
instructions (``engine_kwargs`` minus the project's prepared-input model class).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from actors.prompt import build_prompt
from schemas.job import JobConfig
from schemas.model import PHI4MM


def _media_bytes(cell: dict | None, root: Path) -> bytes | None:
    if not cell:
        return None
    return cell["bytes"] if cell.get("bytes") is not None else (root / cell["path"]).read_bytes()


def _decode(row: dict, root: Path, config: JobConfig):
    """One row -> (vLLM prompt, adapter name or None)."""
    import soundfile as sf
    from PIL import Image

    mm = {}
    image, audio = _media_bytes(row.get("image"), root), _media_bytes(row.get("audio"), root)
    if image is not None:
        mm["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    if audio is not None:
        samples, rate = sf.read(io.BytesIO(audio), dtype="float32", always_2d=True)
        mm["audio"] = (samples.mean(axis=1).astype(np.float32), rate)
    kind = "image_audio" if len(mm) == 2 else next(iter(mm), "text")
    text = row.get("prompt") or getattr(config.prompt, f"default_{kind}")
    prompt = build_prompt(text, int("image" in mm), int("audio" in mm), config.prompt.system)
    adapter = PHI4MM.adapter_for(int("image" in mm), int("audio" in mm))
    return ({"prompt": prompt, "multi_modal_data": mm} if mm else {"prompt": prompt}), adapter


def lora_requests(config: JobConfig) -> dict:
    """{adapter: LoRARequest} for the checkpoint's adapters (empty with model.use_lora off)."""
    from vllm.lora.request import LoRARequest

    if not config.model.use_lora:
        return {}
    return {
        a: LoRARequest(a, i, str(Path(config.model.path) / PHI4MM.adapter_dir(a)))
        for i, a in enumerate(("vision", "speech"), start=1)
    }


def sampling_params(config: JobConfig):
    from vllm import SamplingParams

    s = config.sampling
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        ignore_eos=s.ignore_eos,
    )


def run(config: JobConfig, marks: dict, chunk_rows: int = 0) -> dict:
    """Run the script; ``marks`` gets wall-clock times ('engine_up'). Returns counts for the benchmark.
    ``chunk_rows``: decode and generate that many rows at a time after the engine is up (0: every row
    decoded first, then the engine started and one ``generate``)."""
    from vllm import LLM

    from actors.engines.vllm.engine import engine_kwargs

    root = Path(config.input.path)
    root = root if root.is_dir() else root.parent
    dataset = pads.dataset(config.input.path, format="parquet")
    chunks = (
        (b.to_pylist() for b in dataset.to_batches(batch_size=chunk_rows))
        if chunk_rows
        else iter([dataset.to_table().to_pylist()])
    )
    kwargs = engine_kwargs(config)
    for ours in ("hf_overrides", "enable_mm_embeds"):  # the project's prepared-input model class
        kwargs.pop(ours)
    loras = lora_requests(config)
    params = sampling_params(config)

    def start_engine():
        marks["engine_construct"] = time.time()
        llm = LLM(**kwargs)
        marks["engine_up"] = time.time()
        return llm

    llm, outputs = start_engine() if chunk_rows else None, []
    counts = {"rows": 0, "failed": 0, "decode_s": 0.0}
    for rows in chunks:
        t = time.time()
        prompts, adapters = _decode_rows(rows, root, config, counts)
        # decode-all: from the process's start (imports, reading, decoding), as the earlier runs reported
        counts["decode_s"] += time.time() - (t if chunk_rows else marks["start"])
        if llm is None:  # decode-all: every row decoded, now the engine
            llm = start_engine()
        outputs += llm.generate(
            prompts, params, lora_request=[loras.get(a) for a in adapters], use_tqdm=False
        )
    marks["generated"] = time.time()

    import pyarrow as pa

    texts = [o.outputs[0].text for o in outputs]
    out = Path(config.output.path)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), out / "plain.parquet")
    return {
        "rows": counts["rows"],
        "ok_rows": len(outputs),
        "failed_rows": counts["failed"],  # the plain script drops them: no error rows
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "decode_s": round(counts["decode_s"], 2),
        "engine_start_s": round(marks["engine_up"] - marks["engine_construct"], 2),
        "chunk_rows": chunk_rows,
    }


def _decode_rows(rows: list[dict], root: Path, config: JobConfig, counts: dict) -> tuple[list, list]:
    prompts, adapters = [], []
    for row in rows:
        counts["rows"] += 1
        try:
            prompt, adapter = _decode(row, root, config)
        except Exception:  # a user's script skips what it cannot decode
            counts["failed"] += 1
            continue
        prompts.append(prompt)
        adapters.append(adapter)
    return prompts, adapters
