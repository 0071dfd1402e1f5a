"""The vLLM backend's part of annotation (``schemas.annotation``): SamplingParams fields for a request's
structured output, the repetition stop and confidence, and the confidence fields of its completion.
vLLM is imported only when called."""

from __future__ import annotations

from actors.engines.contract import EngineRequest
from actors.output_check import choice_probabilities, logprob_summary
from schemas.annotation import CHOICE_LOGPROBS, repetition_rule
from schemas.job import JobConfig


def annotation_params(config: JobConfig, request: EngineRequest) -> dict:
    """SamplingParams fields for the request's structured output, the repetition stop and confidence."""
    from vllm.sampling_params import RepetitionDetectionParams, StructuredOutputsParams

    params: dict = {}
    spec = request.structured
    if spec is not None:
        params["structured_outputs"] = StructuredOutputsParams(
            json=spec.json_schema, choice=spec.choice, regex=spec.regex
        )
    rule = repetition_rule(config)
    if rule is not None:
        params["repetition_detection"] = RepetitionDetectionParams(
            max_pattern_size=rule.max_pattern_size,
            min_pattern_size=rule.min_pattern_size,
            min_count=rule.min_count,
        )
    if config.confidence:
        # the sampled token's log-probability at every position; for a choice list, the top tokens too
        params["logprobs"] = CHOICE_LOGPROBS if spec is not None and spec.choice else 0
    return params


def confidence_of(completion, request: EngineRequest) -> dict:
    """EngineResult's confidence fields from a vLLM completion asked for logprobs (none otherwise).
    vLLM's log-probabilities are of the logits after the grammar's mask (before temperature)."""
    if completion.logprobs is None:
        return {}
    sampled = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids, strict=False)]
    mean, low = logprob_summary(sampled)
    fields = {"logprob_mean": mean, "logprob_min": low}
    spec = request.structured
    if spec is not None and spec.choice and completion.logprobs:
        positions = [
            (pos[t].decoded_token or "", [(lp.decoded_token or "", lp.logprob) for lp in pos.values()])
            for pos, t in zip(completion.logprobs, completion.token_ids, strict=False)
        ]
        fields["choice_probs"] = choice_probabilities(positions, spec.choice)
    return fields
