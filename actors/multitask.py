"""Several tasks per row (the config's ``tasks``, ``schemas.multitask``): the CPU stage's per-task entries,
the GPU stage's requests per (row, task, sample) and each task's struct, and the row's overall status.

``n`` samples are ``n`` requests of the same prompt (seeds seed, seed+1, ...): both engines answer plain
requests alike, and vLLM's prefix cache serves the repeats' prompt. Pure functions: no engine, no Ray.
"""

from __future__ import annotations

from actors.engines.contract import EngineRequest, EngineResult
from actors.output_check import choice_probs, verdict
from schemas.multitask import TASK_PREFIX
from schemas.rows import ErrorCode, RowError, Status
from schemas.sampling import RowSampling


def jobs_reads(tasks: dict | None) -> str:
    """The media a job's tasks read between them: "image", "audio" or "any"."""
    kinds = {t.reads for t in (tasks or {}).values()}
    return kinds.pop() if len(kinds) == 1 else "any"


def task_entry(name: str, prompt: str | None = None, prompt_tokens: int | None = None, error=None) -> dict:
    """A ``schemas.multitask.PREPARED_TASK`` value: a runnable task, or one that cannot run (``error``)."""
    return {
        "name": name,
        "prompt": prompt,
        "prompt_tokens": prompt_tokens,
        "error_code": error.code.value if isinstance(error, RowError) else None,
        "error_message": error.message if isinstance(error, RowError) else None,
    }


def task_requests(row: dict, config, alone: bool) -> list[tuple[str, EngineRequest]]:
    """A prepared ok row's requests: ``n`` per runnable task, each with the task's prompt, count, budget
    and structured output, the row's media and sampling overrides (a row's own max_tokens wins)."""
    out, tasks = [], config.tasks
    for entry in row["tasks"] or []:
        if entry["prompt"] is None:
            continue
        spec = tasks[entry["name"]]
        overrides = {name: row[name] for name in RowSampling.model_fields}
        overrides["max_tokens"] = config.max_tokens(overrides["max_tokens"], entry["name"])
        seed = config.sampling.seed if overrides["seed"] is None else overrides["seed"]
        for k in range(spec.n):
            sampling = RowSampling.model_construct(
                **{**overrides, "seed": None if seed is None else seed + k}
            )
            request = EngineRequest.model_construct(
                prompt=entry["prompt"],
                images=row["images"] or [],
                audios=row["audios"] or [],
                adapter=row["adapter"],
                sampling=sampling,
                prompt_tokens=entry["prompt_tokens"],
                alone=alone,
                structured=spec.structured,
            )
            out.append((entry["name"], request))
    return out


def completion_budget(row: dict, config) -> int:
    """The most tokens a prepared row's tasks may generate: each runnable task's budget times its n."""
    total = 0
    for entry in row["tasks"] or []:
        if entry["prompt"] is not None:
            spec = config.tasks[entry["name"]]
            total += config.max_tokens(row["max_tokens"], entry["name"]) * spec.n
    return total


def error_struct(code: str, message: str | None) -> dict:
    return {"status": Status.ERROR.value, "error_code": code, "error_message": message}


def task_struct(spec, results: list[EngineResult]) -> dict:
    """One task's ``TASK_RESULT`` from its samples' results (the first sample is its text)."""
    if failed := next((r for r in results if r.error is not None), None):
        return error_struct(
            ErrorCode.ENGINE_ERROR.value, f"the engine rejected or failed this task: {failed.error}"
        )
    first = results[0]
    out = {
        "status": Status.OK.value,
        "text": first.text,
        "finish_reason": first.finish_reason,
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": sum(r.completion_tokens or 0 for r in results),
        "logprob_mean": first.logprob_mean,
        "logprob_min": first.logprob_min,
        "choice_probs": choice_probs(spec.structured, first.choice_probs),
        "samples": [r.text for r in results] if spec.n > 1 else None,
    }
    if spec.structured is not None and (wrong := verdict(first.text, first.finish_reason, spec.structured)):
        out.update(error_struct(wrong[0].value, wrong[1]))
    return out


def finish_row(row: dict, prepared: dict, structs: dict[str, dict], names: list[str]) -> None:
    """Fill an output row's task columns and its overall status: a row error (media, quarantine) is every
    task's error; a task that could not run keeps its own; the row is ok when every task is, else
    TASKS_FAILED naming the failed tasks. Top-level tokens are the tasks' sums; text stays null."""
    entries = {e["name"]: e for e in prepared.get("tasks") or []}
    for name in names:
        if row["status"] != Status.OK.value:
            structs[name] = error_struct(row["error_code"], row["error_message"])
        elif name not in structs:
            entry = entries.get(name) or {}
            structs[name] = error_struct(entry.get("error_code") or ErrorCode.PREPROCESS_ERROR.value,
                                         entry.get("error_message"))  # fmt: skip
        row[TASK_PREFIX + name] = structs[name]
    if row["status"] != Status.OK.value:
        return
    failed = [f"{n} ({structs[n]['error_code']})" for n in names if structs[n]["status"] != Status.OK.value]
    row.update(
        text=None,
        prompt_tokens=sum(structs[n].get("prompt_tokens") or 0 for n in names),
        completion_tokens=sum(structs[n].get("completion_tokens") or 0 for n in names),
    )
    if failed:
        row.update(
            status=Status.ERROR.value,
            error_code=ErrorCode.TASKS_FAILED.value,
            error_message=f"{len(failed)} of {len(names)} tasks failed: {', '.join(failed)}. Try their columns' "
            "error_message.",
        )


def run_task_rows(engine, indices: list[int], prepared: list[dict], rows: list[dict], config, alone: bool):
    """The GPU stage's ``_run`` for a job with tasks: every (row, task, sample) request in one call."""
    tasks = config.tasks
    per_row = [task_requests(prepared[i], config, alone) for i in indices]
    flat = engine.generate([request for requests in per_row for _, request in requests])
    if len(flat) != sum(map(len, per_row)):  # an engine that loses requests must never lose rows
        raise RuntimeError(f"engine returned {len(flat)} results for {sum(map(len, per_row))} requests")
    results = iter(flat)
    for i, requests in zip(indices, per_row, strict=True):
        answers: dict[str, list[EngineResult]] = {}
        for name, _ in requests:
            answers.setdefault(name, []).append(next(results))
        structs = {name: task_struct(tasks[name], answers[name]) for name in answers}
        finish_row(rows[i], prepared[i], structs, list(tasks))
