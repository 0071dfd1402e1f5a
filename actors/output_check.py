"""Checks an engine's answer against the structured output its row asked for, and condenses token
log-probabilities into the row's confidence columns. Pure functions: no engine, no Ray.

An answer the engine was constrained to can still miss: cut off by max_tokens (finish_reason 'length':
with constrained decoding a complete answer ends with the end token), stopped as a loop, or produced by
an engine whose grammar is looser than the check (vLLM's regex dialect vs Python's ``re``). Such a row is
an error row (OUTPUT_TRUNCATED or OUTPUT_INVALID) that keeps its raw text, never a silent ok.
"""

from __future__ import annotations

import functools
import json
import math
import re

from schemas.annotation import StructuredSpec
from schemas.rows import ErrorCode


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_json))


def problem(text: str, spec: StructuredSpec) -> str | None:
    """What is wrong with ``text`` as an answer to ``spec``; None when it fits."""
    if spec.choice is not None:
        return None if text in spec.choice else f"{text[:80]!r} is not one of the {len(spec.choice)} choices"
    if spec.regex is not None:
        return None if re.fullmatch(spec.regex, text) else f"{text[:80]!r} does not fully match the regex"
    try:
        value = json.loads(text)
        error = next(iter(_validator(json.dumps(spec.json_schema, sort_keys=True)).iter_errors(value)), None)
    except ValueError as e:
        return f"not JSON ({e})"
    except RecursionError:  # the parser and the validator recurse per level: an answer must not end the batch
        return "JSON nested too deeply to parse or check"
    except Exception as e:  # a schema the validator cannot apply: this row's answer fails, not the batch
        return f"the schema could not be applied ({type(e).__name__}: {str(e)[:200]})"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "top level"
    return f"JSON off the schema at {where}: {error.message[:200]}"


def verdict(text: str, finish_reason: str | None, spec: StructuredSpec) -> tuple[ErrorCode, str] | None:
    """The error code and message of a structured answer that does not fit; None for a good one."""
    if finish_reason == "length":
        return ErrorCode.OUTPUT_TRUNCATED, (
            f"the {spec.kind} answer was cut off by max_tokens before it was complete (raw text kept in "
            "text). Try a larger sampling.max_tokens (or the row's max_tokens column)."
        )
    why = problem(text, spec)
    if why is None:
        return None
    looped = " after the answer looped (finish_reason repetition)" if finish_reason == "repetition" else ""
    return ErrorCode.OUTPUT_INVALID, (
        f"the answer does not fit the requested {spec.kind}{looped}: {why} (raw text kept in text). Try "
        "checking the schema / choices / regex, or the repetition settings."
    )


def logprob_summary(logprobs: list[float]) -> tuple[float | None, float | None]:
    """(mean, min) of an answer's token log-probabilities; (None, None) for an empty answer."""
    if not logprobs:
        return None, None
    return sum(logprobs) / len(logprobs), min(logprobs)


def choice_probabilities(
    positions: list[tuple[str, list[tuple[str, float]]]], choices: list[str]
) -> list[float]:
    """Each choice's probability from the answer's positions: (the sampled token's text, the top tokens'
    (text, logprob)) in order.

    With constrained decoding a token that leaves exactly one choice possible commits the answer to it
    (every later token is forced to complete it), so the choice's probability is the sum, over such
    committing tokens, of the probability of the answer's path up to them times theirs. The walk follows
    the sampled path while it is still ambiguous (a prefix several choices share). Mass on a shared
    prefix the answer did not take, or outside the top tokens, is not attributed: the probabilities sum
    to at most 1."""
    probs = [0.0] * len(choices)
    prefix, path = "", 0.0
    for sampled, top in positions:
        advance = None
        for text, logprob in top:
            if not text or logprob is None or math.isinf(logprob):
                continue
            matches = [k for k, c in enumerate(choices) if c.startswith(prefix + text)]
            if len(matches) == 1:
                probs[matches[0]] += math.exp(path + logprob)
            elif text == sampled and matches:
                advance = logprob
        if advance is None:  # the sampled token committed the answer (or left the choices): done
            break
        prefix, path = prefix + sampled, path + advance
    return [min(p, 1.0) for p in probs]


def choice_probs(spec: StructuredSpec | None, probs: list[float] | None) -> list[dict] | None:
    """The output's ``choice_probs`` ([{choice, prob}], in the config's order) from an engine's figures."""
    if spec is None or spec.choice is None or probs is None:
        return None
    return [{"choice": c, "prob": p} for c, p in zip(spec.choice, probs, strict=True)]
