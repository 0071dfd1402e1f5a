"""The vLLM backend (``engine.backend: vllm``): engine arguments from the job config, LoRA by modality,
continuous batching with per-request failure isolation.

vLLM is imported only when an engine is built, so this module is cheap to import.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from actors.engines.adapters import lora_rank_of, resolve_adapters
from actors.engines.contract import EngineRequest, EngineResult, effective_sampling, warm_up
from actors.engines.vllm.annotation import annotation_params, confidence_of
from actors.engines.vllm.loop import EngineLoop, LoopStats
from actors.engines.vllm.plugin import PREPARED_ARCHITECTURE, register
from actors.engines.vllm.stats import attach, requests_held
from actors.media.features import MASK_SIDE, tensor_view
from schemas.job import JobConfig
from schemas.model import Adapter

logger = logging.getLogger(__name__)


def engine_kwargs(config: JobConfig, adapter_dirs: dict[Adapter, Path] | None = None) -> dict:
    """Keyword arguments for ``vllm.LLM`` derived from the job config; ``adapter_dirs``: the adapters in
    use (``actors.engines.adapters.resolve_adapters``, resolved here when not given)."""
    model, engine = config.model, config.engine
    kwargs = dict(
        model=model.path,
        trust_remote_code=model.trust_remote_code,
        load_format=model.load_format,
        dtype=engine.dtype,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=engine.tensor_parallel_size,
        enforce_eager=engine.enforce_eager,
        seed=engine.seed,
        distributed_executor_backend=engine.executor,
        # the CPU stage's prepared media (actors.engines.vllm.phi4mm); dict inputs count as embeddings for vLLM
        hf_overrides={"architectures": [PREPARED_ARCHITECTURE]},
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": engine.max_images_per_row, "audio": engine.max_audios_per_row},
        mm_processor_kwargs={"dynamic_hd": engine.dynamic_hd},
        # structured outputs (schemas.annotation): compact JSON, fewer tokens and no whitespace to loop on
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        # per-step statistics feed the run summary's useful-work figures (actors.engines.vllm.stats)
        disable_log_stats=False,
    )
    if engine.kv_cache_memory_gib:
        kwargs["kv_cache_memory_bytes"] = int(engine.kv_cache_memory_gib * 2**30)
    if engine.async_scheduling is not None:
        kwargs["async_scheduling"] = engine.async_scheduling
    if engine.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    if model.use_lora:
        dirs = adapter_dirs if adapter_dirs is not None else resolve_adapters(model, config.storage)
        kwargs.update(enable_lora=True, max_loras=2, max_lora_rank=model.max_lora_rank or lora_rank_of(dirs))
    return kwargs


def image_inputs(images: list[dict]) -> dict:
    """Prepared images -> the dict ``actors.engines.vllm.phi4mm`` takes as the image items of one request."""
    import torch

    return {
        "image_canvas": [tensor_view(im["canvas"], "u1", (im["height"], im["width"], 3)) for im in images],
        "image_attention_mask": [tensor_view(im["mask"], "u1", (-1, MASK_SIDE, MASK_SIDE)) for im in images],
        "image_sizes": [torch.tensor([im["height"], im["width"]]) for im in images],
        "num_img_tokens": [im["tokens"] for im in images],
    }


def engine_prompt(request: EngineRequest) -> dict:
    """The vLLM prompt of one request: text, the prepared media as tensors, their cache keys."""
    prompt: dict = {"prompt": request.prompt}
    mm, uuids = {}, {}
    if request.images:
        mm["image"] = image_inputs(request.images)
        uuids["image"] = [im["uuid"] for im in request.images]
    if request.audios:
        mm["audio"] = {
            "input_audio_embeds": [
                tensor_view(a["features"], "<f4", (a["frames"], -1)) for a in request.audios
            ],
            "audio_with_images": [bool(a["with_images"]) for a in request.audios],
        }
        uuids["audio"] = [a["uuid"] for a in request.audios]
    if mm:
        # the uuids spare the engine hashing megabytes of pixels per request and let it reuse an
        # image's encoder output across rows
        prompt.update(multi_modal_data=mm, multi_modal_uuids=uuids)
    return prompt


class Engine:
    """One vLLM engine behind a continuous-batching loop (``actors.engines.contract.Engine``)."""

    def __init__(self, config: JobConfig):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.config = config
        started = time.perf_counter()
        register()
        dirs = resolve_adapters(config.model, config.storage) if config.model.use_lora else {}
        self.llm = LLM(**engine_kwargs(config, dirs))
        self.lora_requests = {
            adapter: LoRARequest(f"phi4mm-{adapter}", lora_id, str(path))
            for lora_id, (adapter, path) in enumerate(dirs.items(), start=1)
        }
        self.loop = EngineLoop(self.llm.llm_engine)
        self.loop.work = attach(self.llm.llm_engine)
        self._capacity_checked = False
        warm_up(self)
        # The run summary's counts are the rows' requests and steps: the warm-up's would make a 2,000-row
        # run read 2,001 requests. The loop is idle now (the warm-up's one request has come back).
        self.loop.stats = LoopStats()
        self.loop.work.reset()
        self.startup_s = time.perf_counter() - started
        self.ready_at = time.time()  # wall clock, so a run can tell when its engines came up
        logger.info("vLLM engine ready in %.1f s", self.startup_s)

    def _sampling_params(self, request: EngineRequest):
        from vllm import SamplingParams

        s = effective_sampling(self.config.sampling, request.sampling)
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            ignore_eos=s.ignore_eos,
            **annotation_params(self.config, request),
        )

    def _check_capacity(self, requests: list[EngineRequest]) -> None:
        """Once, on the first rows: say so when the KV cache cannot hold the requests this engine is sent at
        once, at these rows' sizes (they would wait, or be preempted and computed again)."""
        counted = [r.prompt_tokens for r in requests if r.prompt_tokens]
        if self._capacity_checked or not counted:
            return
        self._capacity_checked = True
        size = (
            sum(counted) / len(counted)
            + effective_sampling(self.config.sampling, requests[0].sampling).max_tokens
        )
        held = requests_held(self.loop.work.kv_cache_tokens, size)
        generate = self.config.resources.generate
        sent = min(self.config.engine.max_num_seqs, generate.batch_size * generate.concurrent_batches)
        if held < sent:
            logger.warning(
                "this engine's KV cache holds %d tokens: %d requests of these rows' size (%.0f tokens with "
                "their new tokens), but up to %d run at once (engine.max_num_seqs %d; resources.generate: "
                "batch_size x concurrent_batches %d); the rest wait or are preempted and computed again. Try "
                "a larger engine.gpu_memory_utilization or engine.kv_cache_memory_gib, fewer engines per GPU, "
                "or engine.max_num_seqs %d.",
                self.loop.work.kv_cache_tokens, held, size, sent, self.config.engine.max_num_seqs,
                generate.batch_size * generate.concurrent_batches, max(held, 1),
            )  # fmt: skip

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        self._check_capacity(requests)
        futures = []
        for r in requests:
            try:
                params = self._sampling_params(r)
            except Exception as e:  # e.g. a sampling value vLLM refuses: this row only
                futures.append(e)
                continue
            lora = self.lora_requests.get(r.adapter) if r.adapter else None
            futures.append(self.loop.submit(engine_prompt(r), params, lora, alone=r.alone))
        return [self._result(f, r) for f, r in zip(futures, requests, strict=True)]

    @staticmethod
    def _result(future, request: EngineRequest) -> EngineResult:
        try:
            if isinstance(future, Exception):
                raise future
            out, queued_s, engine_s = future.result()
        except Exception as e:
            return EngineResult(error=f"{type(e).__name__}: {e}")
        completion = out.outputs[0]
        return EngineResult(
            text=completion.text,
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason,
            queued_s=queued_s,
            engine_s=engine_s,
            **confidence_of(completion, request),
        )

    def stats(self) -> dict:
        s = self.loop.stats
        since_first = time.perf_counter() - s.first_admitted if s.first_admitted else 0.0
        return {"startup_s": round(self.startup_s, 2), "ready_at": round(self.ready_at, 3),
                "requests": s.requests, "rejected": s.rejected, "steps": s.steps, "busy_s": round(s.busy_s, 2),
                "max_in_flight": s.max_in_flight, "work": self.loop.work.figures(since_first)}  # fmt: skip
