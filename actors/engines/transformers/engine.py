"""The transformers backend (``engine.backend: transformers``): transformers' native
``Phi4MultimodalForCausalLM`` on a transformers-format checkpoint, its LoRA adapters loaded with PEFT
(``load_adapter``) and switched with ``set_adapter``.

A call's requests are grouped by adapter (the routing rule of ``schemas.model.PHI4MM.adapter_for``:
image and image+audio rows run with vision-lora, audio-only rows with speech-lora, text rows with none)
and by sampling, and each group runs as left-padded batched ``generate`` calls of at most
``engine.max_num_seqs`` rows. The model takes the CPU stage's prepared media as the checkpoint's
processor would hand them over: each image's crops (``actors.media.features.crops_from_canvas``), its patch
masks and canvas size, each clip's log-mel features; the prompt's media tags expand into the
checkpoint's placeholder tokens, as the processor expands them. Token accounting is vLLM's: the prompt
with its placeholders, and generated tokens up to and including the end token or the one that completes
a stop string. Imports torch and transformers: load it only in the GPU actor.
"""

from __future__ import annotations

import logging
import threading
import time
from itertools import groupby
from pathlib import Path

import torch

from actors.engines.contract import EngineRequest, EngineResult, effective_sampling, warm_up
from actors.engines.transformers.annotation import Grammars, Loops, StepLogprobs
from actors.media.features import MASK_SIDE, crops_from_canvas, tensor_view
from actors.output_check import logprob_summary
from actors.tokens import audio_tokens_for_frames
from schemas.annotation import CHOICE_LOGPROBS, first_loop, repetition_rule
from schemas.job import JobConfig, SamplingConfig
from schemas.model import PHI4MM

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model(config: JobConfig, device: str, dtype: torch.dtype):
    """The checkpoint's model with its adapters (``model.use_lora``: the job's own ``model.adapters`` where
    set, else the checkpoint's), in eval mode on ``device``."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    from actors.engines.transformers import patches

    patches.apply()
    path = config.model.path
    if config.model.load_format == "dummy":  # random weights of the checkpoint's shapes, made on the device
        torch.manual_seed(config.engine.seed)
        with torch.device(device):
            model = Phi4MultimodalForCausalLM._from_config(
                Phi4MultimodalConfig.from_pretrained(path), dtype=dtype
            )
    else:
        model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    if config.model.use_lora:
        from transformers.utils import logging as hf_logging

        from actors.engines.adapters import resolve_adapters

        custom = config.model.adapters.custom()
        local = resolve_adapters(config.model, config.storage)  # the job's own, copied here if remote
        # each adapter's load report lists the base model's and the other adapter's weights as "missing"
        hf_logging.set_verbosity_error()
        for adapter in ("vision", "speech"):
            folder = PHI4MM.adapter_dir(adapter)
            # transformers 5.19 reads a local adapter's subfolder only as a path; a hub id takes subfolder
            if adapter in custom or Path(path).is_dir():
                model.load_adapter(str(local[adapter]), adapter_name=adapter)
            else:
                model.load_adapter(path, adapter_name=adapter, adapter_kwargs={"subfolder": folder})
        hf_logging.set_verbosity_warning()
    return model


def media_inputs(requests: list[EngineRequest], device: str, dtype: torch.dtype) -> dict:
    """The model's media keyword arguments for a batch: images and clips in row order, padded."""
    inputs: dict = {}
    images = [im for r in requests for im in r.images]
    if images:
        # the canvases go to the device as uint8 (the smallest form) and become crops there, as in vLLM
        crops = [
            crops_from_canvas(tensor_view(im["canvas"], "u1", (im["height"], im["width"], 3)).to(device))
            for im in images
        ]
        masks = [tensor_view(im["mask"], "u1", (-1, MASK_SIDE, MASK_SIDE)) for im in images]
        most = max(c.shape[0] for c in crops)
        pixels = torch.zeros(len(images), most, *crops[0].shape[1:], device=device, dtype=dtype)
        mask = torch.zeros(len(images), most, MASK_SIDE, MASK_SIDE, dtype=torch.bool)
        for i, (c, m) in enumerate(zip(crops, masks, strict=True)):
            pixels[i, : len(c)], mask[i, : len(m)] = c, m.bool()
        inputs.update(
            image_pixel_values=pixels,
            image_attention_mask=mask.to(device),
            image_sizes=torch.tensor([[im["height"], im["width"]] for im in images]).to(device),
        )
    audios = [a for r in requests for a in r.audios]
    if audios:
        frames = torch.tensor([a["frames"] for a in audios])
        features = torch.zeros(len(audios), int(frames.max()), PHI4MM.audio_mel_bins)
        for i, a in enumerate(audios):
            features[i, : a["frames"]] = tensor_view(
                a["features"], "<f4", (a["frames"], PHI4MM.audio_mel_bins)
            )
        inputs.update(
            audio_input_features=features.to(device, dtype),
            audio_embed_sizes=torch.tensor([audio_tokens_for_frames(int(f)) for f in frames]).to(device),
            # like the checkpoint's feature extractor: a mask only when several clips are padded together
            audio_attention_mask=(torch.arange(int(frames.max()))[None] < frames[:, None]).to(device)
            if len(audios) > 1
            else None,
        )
    return inputs


class Engine:
    """One transformers model per actor (``actors.engines.contract.Engine``); calls run one at a time."""

    def __init__(self, config: JobConfig):
        from transformers import AutoTokenizer

        started = time.perf_counter()
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = config.engine.dtype
        self.dtype = _DTYPES.get(dtype, torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        self.model = load_model(config, self.device, self.dtype)
        self.image_token = self.tokenizer.convert_ids_to_tokens(PHI4MM.image_token_id)
        self.audio_token = self.tokenizer.convert_ids_to_tokens(PHI4MM.audio_token_id)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id
        self.loop_rule = repetition_rule(config)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.grammars = Grammars(self.tokenizer, vocab, sorted(self.eos_ids))  # structured outputs
        self._lock = threading.Lock()
        self._adapter: str | None = "unset"
        self._stats = _zero_stats()
        warm_up(self)
        self._stats = _zero_stats()  # the run's rows only, not the warm-up
        self.startup_s = time.perf_counter() - started
        self.ready_at = time.time()
        logger.info("transformers engine ready in %.1f s on %s", self.startup_s, self.device)

    def prompt_ids(self, request: EngineRequest) -> list[int]:
        """The prompt's token ids, each media tag expanded into its placeholder tokens."""
        text = request.prompt
        for n, image in enumerate(request.images, start=1):
            text = text.replace(PHI4MM.image_tag(n), self.image_token * int(image["tokens"]), 1)
        for n, audio in enumerate(request.audios, start=1):
            tokens = audio_tokens_for_frames(int(audio["frames"]))
            text = text.replace(PHI4MM.audio_tag(n), self.audio_token * tokens, 1)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        called = time.perf_counter()
        results: list[EngineResult | None] = [None] * len(requests)
        todo = []
        for i, request in enumerate(requests):
            try:
                sampling = effective_sampling(self.config.sampling, request.sampling)
                ids = self.prompt_ids(request)
                limit = self.config.engine.max_model_len
                if len(ids) + sampling.max_tokens > limit:
                    raise ValueError(
                        f"the prompt's {len(ids)} tokens plus max_tokens {sampling.max_tokens} exceed the "
                        f"maximum context length ({limit}, engine.max_model_len)"
                    )
            except Exception as e:  # this request only
                self._stats["rejected"] += 1
                results[i] = EngineResult(error=f"{type(e).__name__}: {e}")
                continue
            # one adapter per batch; and audio is projected per batch (with images: vision-speech), so
            # rows of different routes never share one even where no adapter is applied
            route = PHI4MM.adapter_for(len(request.images), len(request.audios))
            alone = (
                i if request.alone else -1
            )  # a row suspected of crashing the engine runs in a batch of one
            spec = request.structured.to_json() if request.structured else None  # one grammar per batch
            key = (request.adapter, route, _sampling_key(sampling), spec, alone)
            todo.append((key, i, ids, sampling))
        todo.sort(key=lambda t: (str(t[0]), t[1]))
        size = self.config.engine.max_num_seqs
        for _, group in groupby(todo, key=lambda t: t[0]):
            group = list(group)
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                for (_, i, _, _), result in zip(chunk, self._run(requests, chunk, called), strict=True):
                    results[i] = result
        return results

    def _run(self, requests, chunk, called: float) -> list[EngineResult]:
        """One batch of one group; if it fails, each of its requests alone, so only the culprit fails."""
        try:
            return self._generate_batch([requests[i] for _, i, _, _ in chunk], chunk, called)
        except Exception as e:
            if len(chunk) == 1:
                self._stats["rejected"] += 1
                return [EngineResult(error=f"{type(e).__name__}: {e}")]
            logger.warning("a batch of %d failed (%s); running its requests one at a time", len(chunk), e)
            self._stats["split_batches"] += 1
            return [r for item in chunk for r in self._run(requests, [item], called)]

    def _generate_batch(self, batch: list[EngineRequest], chunk, called: float) -> list[EngineResult]:
        sampling: SamplingConfig = chunk[0][3]
        ids = [c[2] for c in chunk]
        longest = max(map(len, ids))
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, prompt in enumerate(ids):  # left padding: every row's next token is at the end
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            attention[row, longest - len(prompt) :] = 1
        max_new = max(c[3].max_tokens for c in chunk)
        with self._lock:
            admitted = time.perf_counter()
            self._use_adapter(batch[0].adapter)
            generation = dict(
                max_new_tokens=max_new,
                do_sample=sampling.temperature > 0,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
            if sampling.temperature > 0:
                generation.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
            if sampling.ignore_eos:
                generation["min_new_tokens"] = max_new
            criteria = [_StopStrings(self.tokenizer, sampling.stop, longest)] if sampling.stop else []
            if self.loop_rule is not None:
                criteria.append(Loops(self.loop_rule, longest))
            if criteria:
                generation["stopping_criteria"] = criteria
            spec = batch[0].structured
            processors = [self.grammars.processor(spec)] if spec is not None else []
            recorder = None
            if self.config.confidence:  # last: it sees the grammar's mask and sampling's processors
                recorder = StepLogprobs(CHOICE_LOGPROBS if spec is not None and spec.choice else 0)
                processors.append(recorder)
            if processors:
                generation["logits_processor"] = processors
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    **media_inputs(batch, self.device, self.dtype),
                    **generation,
                )
                if recorder is not None:
                    recorder.finish(out)
            done = time.perf_counter()
            stats = self._stats
            stats["requests"] += len(batch)
            stats["steps"] += out.shape[1] - longest
            stats["busy_s"] += done - admitted
            stats["max_in_flight"] = max(stats["max_in_flight"], len(batch))
        new = out[:, longest:].tolist()
        results = [
            self._result(tokens, len(prompt), c[3], admitted - called, done - called,
                         recorder.row(row) if recorder else None)
            for row, (tokens, prompt, c) in enumerate(zip(new, ids, chunk, strict=True))
        ]  # fmt: skip
        if recorder is not None and spec is not None and spec.choice:
            for row, (tokens, result) in enumerate(zip(new, results, strict=True)):
                kept = tokens[: result.completion_tokens]
                result.choice_probs = recorder.choice_probs(self.tokenizer, row, kept, spec.choice)
        return results

    def _use_adapter(self, adapter: str | None) -> None:
        if adapter == self._adapter or not self.config.model.use_lora:
            return
        if adapter is None:
            self.model.disable_adapters()
        else:
            self.model.enable_adapters()
            self.model.set_adapter(adapter)
        self._adapter = adapter

    def _result(self, tokens, prompt_tokens, sampling, queued_s, engine_s, logprobs=None) -> EngineResult:
        """A row's answer from its generated ids: cut at its own max_tokens, the end token, a loop
        (``repetition``) or a stop string."""
        tokens = tokens[: sampling.max_tokens]
        finish = "length"
        if not sampling.ignore_eos:
            end = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
            if end is not None:
                tokens, finish = tokens[: end + 1], "stop"
        if self.loop_rule is not None:  # as vLLM: the end token or max_tokens win at the same step
            looped = first_loop(tokens, self.loop_rule)
            # a row the Loops criterion stopped ends right at its loop, short of max_tokens and an end token
            cut_short = finish == "length" and len(tokens) < sampling.max_tokens
            if looped is not None and (looped < len(tokens) or cut_short):
                tokens, finish = tokens[:looped], "repetition"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for k in range(1, len(tokens) + 1) if sampling.stop else ():
            prefix = self.tokenizer.decode(tokens[:k], skip_special_tokens=True)
            hits = [prefix.find(s) for s in sampling.stop if s in prefix]
            if hits:
                tokens, text, finish = tokens[:k], prefix[: min(hits)], "stop"
                break
        return EngineResult(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            finish_reason=finish,
            queued_s=queued_s,
            engine_s=engine_s,
            **_confidence(logprobs, len(tokens)),
        )

    def stats(self) -> dict:
        s = self._stats
        return {"startup_s": round(self.startup_s, 2), "ready_at": round(self.ready_at, 3),
                "requests": s["requests"], "rejected": s["rejected"], "split_batches": s["split_batches"],
                "steps": s["steps"],
                "busy_s": round(s["busy_s"], 2), "max_in_flight": s["max_in_flight"]}  # fmt: skip


class _StopStrings:
    """Ends a row once its decoded answer holds a stop string (transformers' own ``stop_strings`` needs a
    byte-level vocabulary). A ``StoppingCriteria``: one flag per row."""

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _confidence(logprobs: list[float] | None, kept: int) -> dict:
    if logprobs is None:
        return {}
    mean, low = logprob_summary(logprobs[:kept])
    return {"logprob_mean": mean, "logprob_min": low}


def _zero_stats() -> dict:
    # split_batches: batches that failed and ran their requests one at a time (each a slow path)
    return {"requests": 0, "rejected": 0, "split_batches": 0, "steps": 0, "busy_s": 0.0, "max_in_flight": 0}


def _sampling_key(s: SamplingConfig) -> tuple:
    """Requests that can share one generate call: the same sampling but for max_tokens (cut per row)."""
    return (s.temperature, s.top_p, s.seed, tuple(s.stop), s.ignore_eos)
