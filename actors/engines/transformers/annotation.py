"""The transformers backend's part of annotation (``schemas.annotation``): constrained decoding with
xgrammar's logits processor for ``generate`` (the grammar library vLLM uses, compiled the same way:
compact JSON, choices as alternatives of literals), the loop stop as a stopping criterion, and
choice probabilities from ``generate``'s scores. Imports torch: load it only in the GPU actor."""

from __future__ import annotations

import functools
import json

import torch

from actors.output_check import choice_probabilities
from schemas.annotation import StructuredSpec, loops


def _ebnf_literal(text: str) -> str:
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}
    body = "".join(escapes.get(c, f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text)
    return f'"{body}"'


class Grammars:
    """Compiled grammars for one tokenizer, built on first use and cached per spec."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids

    @functools.cached_property
    def compiler(self):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
        )
        return xgr.GrammarCompiler(info)

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one Grammars per engine, for the actor's life)
    def compiled(self, spec_json: str):
        spec = StructuredSpec.from_json(spec_json)
        if spec.json_schema is not None:
            schema = json.dumps(spec.json_schema)
            return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        if spec.choice is not None:
            return self.compiler.compile_grammar("root ::= " + " | ".join(map(_ebnf_literal, spec.choice)))
        return self.compiler.compile_regex(spec.regex)

    def processor(self, spec: StructuredSpec):
        """A logits processor for one ``generate`` call whose rows all ask ``spec`` (it is stateful)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled(spec.to_json()))


class Loops:
    """Ends a row once its answer loops (``schemas.annotation.loops``). A ``StoppingCriteria``."""

    def __init__(self, rule, prompt_length: int):
        self.rule, self.start = rule, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = input_ids[:, self.start :].tolist()
        return torch.tensor([loops(r, self.rule) for r in rows], device=input_ids.device)


class StepLogprobs:
    """A logits processor (put last) that records each row's log-probability of the token it samples and,
    for choice lists, the top tokens at every step, holding one step's distribution at a time:
    ``output_scores`` would keep every step's vocabulary-wide scores (GBs for a batch of long answers).
    Its distributions are the final ones: after the grammar's mask and sampling's processors."""

    def __init__(self, top_k: int = 0):
        self.top_k, self.previous = top_k, None
        self.sampled: list[list[float]] = []  # per step, per row
        self.tops: list[tuple[list, list]] = []  # per step: (token ids, logprobs), per row

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        if self.top_k:
            top = torch.topk(self.previous, self.top_k)
            self.tops.append((top.indices.tolist(), top.values.tolist()))
        return scores

    def finish(self, sequences: torch.Tensor) -> None:
        """After ``generate``: the last step's sampled tokens."""
        self._take(sequences[:, -1])
        self.previous = None

    def _take(self, chosen: torch.Tensor) -> None:
        if self.previous is not None:
            self.sampled.append(
                self.previous.gather(1, chosen[:, None].to(self.previous.device))[:, 0].tolist()
            )

    def row(self, row: int) -> list[float]:
        return [step[row] for step in self.sampled]

    def choice_probs(self, tokenizer, row: int, tokens: list[int], choices) -> list[float]:
        """A row's choice probabilities (``actors.output_check.choice_probabilities``)."""
        positions = []
        for (ids, values), token in zip(self.tops, tokens, strict=False):
            top = [(tokenizer.decode([t]), v) for t, v in zip(ids[row], values[row], strict=True)]
            positions.append((tokenizer.decode([token]), top))
        return choice_probabilities(positions, choices)
