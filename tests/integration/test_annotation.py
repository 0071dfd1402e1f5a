"""Annotation on the tiny model with the real vLLM CPU engine: the structured-output YAML examples under
jobs/configs/ (a choice list, a JSON schema) run through the stages in this process, the output read back
with ``datasets``; one run through the whole pipeline on local Ray with per-row structured outputs and
looping free-text rows; and the transformers backend (loops, confidence, the examples constrained). The
tiny checkpoints have a byte-level tokenizer here (``tiny_byte_model``): their random weights write
garbage, but constrained decoding makes the garbage fit what was asked."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from pipelines.phi4mm import output_shape, run_pipeline
from pipelines.validate import check_input_columns
from schemas.job import JobConfig
from tests.helpers import REPO, make_config

CONFIGS = REPO / "jobs" / "configs"


@pytest.fixture(scope="module")
def engine(tiny_byte_model, tmp_path_factory):
    # the engine's sampling is every job's default here (a row's max_tokens column overrides it)
    config = make_config(tiny_byte_model, tmp_path_factory.mktemp("annotate"), confidence=True,
                         sampling={"max_tokens": 96}, engine={"init_hook": "jobs.tiny_vision:shrink_siglip"})  # fmt: skip
    return config, GenerateRows(config, run_id="annotate").engine


def _run_example(name: str, table: pa.Table, engine, tmp_path):
    """The YAML example on ``table`` with the tiny sections; its output as datasets reads it."""
    import datasets

    base, shared = engine
    tmp_path.mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "in.parquet")
    config = JobConfig.from_yaml(CONFIGS / f"{name}.yaml", {
        "input.path": str(tmp_path / "in.parquet"), "output.path": str(tmp_path / "out"),
        "model": base.model.model_dump(), "engine": base.engine.model_dump(),
        "resources": base.resources.model_dump(), "sampling.max_tokens": base.sampling.max_tokens,
    })  # fmt: skip
    check_input_columns(config, table.schema)  # the pre-run checks accept the example on such data
    generated = GenerateRows(config, "annotate", engine_factory=lambda _: shared)(
        PreprocessRows(config)(table)
    )
    written = output_shape(config, SimpleNamespace(schema=table.schema)).apply(generated)
    pq.write_table(written, tmp_path / "part-0.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "part-0.parquet"), split="train")
    return config, ds


def _check_confidence(row: dict) -> None:
    assert row["logprob_min"] <= row["logprob_mean"] <= 0


def test_choice_example_gives_labels_in_the_set_with_their_probabilities(engine, tmp_path):
    reviews = ["Great mug, keeps coffee hot.", "Broke after a day.", "It is a mug.", "Love it!"]
    table = pa.table({"review_id": ["r0", "r1", "r2", "short"], "review": reviews,
                      "max_tokens": pa.array([None, None, None, 3], pa.int32())})  # fmt: skip
    config, ds = _run_example("annotate_choice", table, engine, tmp_path)
    choices = config.structured.choice
    rows = {r["id"]: r for r in ds}
    assert len(rows) == 4
    for key in ("r0", "r1", "r2"):
        row = rows[key]
        assert row["status"] == "ok"
        assert row["label"] in choices and row["finish_reason"] == "stop"
        _check_confidence(row)
        probs = {p["choice"]: p["prob"] for p in row["choice_probs"]}
        assert list(probs) == choices and all(0 <= p <= 1 for p in probs.values())
        assert sum(probs.values()) <= 1 + 1e-4 and probs[row["label"]] > 0
    cut = rows["short"]  # 3 tokens cannot spell a label: cut off, raw text kept
    assert cut["status"] == "error" and cut["error_code"] == "OUTPUT_TRUNCATED"
    assert (
        cut["label"] and any(c.startswith(cut["label"]) for c in choices) and cut["finish_reason"] == "length"
    )


def test_json_example_validates_every_answer_and_types_its_column(engine, tmp_path):
    import datasets
    from jsonschema import Draft202012Validator

    n = 4
    table = pa.table({
        "sku": [f"s{i}" for i in range(n)] + ["short"], "photo": pa.nulls(n + 1, pa.string()),
        "category": ["mug", "chair", "toy", "scarf", "lamp"], "title": ["Blue", "Oak", "Rex", "Wool", "Glow"],
        "max_tokens": pa.array([None] * n + [5], pa.int32()),
    })  # fmt: skip
    config, ds = _run_example("annotate_json", table, engine, tmp_path)
    validator = Draft202012Validator(config.structured.json_schema)
    features = ds.features["attributes"]
    assert features == {"colour": datasets.Value("string"), "for_children": datasets.Value("bool"),
                        "material": datasets.Value("string")}  # fmt: skip
    rows = {r["id"]: r for r in ds}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) >= n - 1  # constrained: a random model's answers fit too (one may loop)
    for row in ok:
        answer = json.loads(row["raw_json"])
        assert validator.is_valid(answer) and row["attributes"] == answer
    for row in rows.values():
        if row["status"] != "ok":
            assert row["error_code"] in ("OUTPUT_TRUNCATED", "OUTPUT_INVALID") and row["raw_json"]
            assert row["attributes"] is None
    cut = rows["short"]
    assert cut["error_code"] == "OUTPUT_TRUNCATED" and cut["raw_json"].startswith("{")


def test_a_run_with_per_row_structured_outputs_and_looping_rows(local_ray, tiny_byte_model, tmp_path):
    run_with_per_row_structured_outputs(
        tiny_byte_model, tmp_path, engine={"init_hook": "jobs.tiny_vision:shrink_siglip"}
    )


def run_with_per_row_structured_outputs(model: str, tmp_path, **sections) -> None:
    """Free-text rows of a random model loop and are stopped (finish_reason repetition, counted in the
    summary); a row asking its own choice list gets one; a bad cell is an INVALID_STRUCTURED row. The
    whole pipeline on the running Ray; ``sections`` say where the engine runs (tests/gpu: on CUDA)."""
    import datasets

    ask = {"free-0": None, "free-1": None, "choice": json.dumps({"choice": ["yes", "no"]}),
           "bad": '{"choice": []}'}  # fmt: skip
    table = pa.table({"id": list(ask), "prompt": ["tell me about the world"] * 4, "ask": list(ask.values())})
    pq.write_table(table, tmp_path / "in.parquet")
    config = make_config(
        model, tmp_path, confidence=True, sampling={"max_tokens": 200},
        input={"path": str(tmp_path / "in.parquet"), "columns": {"image": None, "audio": None, "structured": "ask"}},
        **sections,
    )  # fmt: skip
    summary = run_pipeline(config, run_id="annotate")
    assert summary["audit"]["ok"]
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "part-*.parquet"), split="train")
    rows = {r["id"]: r for r in ds}
    looped = [k for k, r in rows.items() if r["finish_reason"] == "repetition"]
    assert {"free-0", "free-1"} & set(looped)
    assert summary["finish_reasons"].get("repetition") == len(looped)
    for key in ("free-0", "free-1"):
        assert rows[key]["status"] == "ok" and rows[key]["choice_probs"] is None
        _check_confidence(rows[key])
    assert rows["choice"]["status"] == "ok" and rows["choice"]["text"] in ("yes", "no")
    assert [p["choice"] for p in rows["choice"]["choice_probs"]] == ["yes", "no"]
    bad = rows["bad"]
    assert bad["error_code"] == "INVALID_STRUCTURED" and "Try " in bad["error_message"]


def test_transformers_backend_stops_loops_and_scores_answers(tiny_transformers_model, tmp_path):
    """The transformers backend stops loops by vLLM's rule and scores answers from generate's scores."""
    from actors.engines.contract import EngineRequest
    from schemas.sampling import RowSampling

    config = make_config(tiny_transformers_model, tmp_path, engine={"backend": "transformers"},
                         model={"load_format": "auto"}, sampling={"max_tokens": 200}, confidence=True)  # fmt: skip
    engine = GenerateRows(config, run_id="annotate").engine
    prompts = [f"<|user|>{w} the world<|end|><|assistant|>" for w in ("tell me about", "describe", "hello")]
    results = engine.generate([EngineRequest(prompt=p) for p in prompts])
    looped = [r for r in results if r.finish_reason == "repetition"]
    assert looped  # a random model loops, and the loop is cut where it first repeats min_count times
    rule = config.repetition
    for r in looped:  # stopped once a pattern repeated min_count times: that many tokens at least
        assert rule.min_pattern_size * rule.min_count <= r.completion_tokens < 200
    for r in results:
        assert r.logprob_min <= r.logprob_mean <= 0
    short = engine.generate([EngineRequest(prompt=prompts[0], sampling=RowSampling(max_tokens=3))])[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3 and short.logprob_mean is not None


def test_transformers_backend_runs_the_examples_constrained(tiny_transformers_byte_model, tmp_path):
    """Constrained decoding on the transformers backend (xgrammar's logits processor): the same examples'
    answers fit, with choice probabilities."""
    from jsonschema import Draft202012Validator

    config = make_config(tiny_transformers_byte_model, tmp_path, engine={"backend": "transformers"},
                         model={"load_format": "auto"}, sampling={"max_tokens": 96}, confidence=True)  # fmt: skip
    engine = (config, GenerateRows(config, run_id="annotate").engine)
    reviews = pa.table({"review_id": ["r0", "r1", "short"], "review": ["Great mug.", "Broke.", "Fine."],
                        "max_tokens": pa.array([None, None, 3], pa.int32())})  # fmt: skip
    choice, ds = _run_example("annotate_choice", reviews, engine, tmp_path / "choice")
    rows = {r["id"]: r for r in ds}
    for key in ("r0", "r1"):
        assert rows[key]["status"] == "ok" and rows[key]["label"] in choice.structured.choice
        probs = [p["prob"] for p in rows[key]["choice_probs"]]
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-4
        _check_confidence(rows[key])
    assert rows["short"]["error_code"] == "OUTPUT_TRUNCATED" and rows["short"]["label"]
    products = pa.table({"sku": ["s0", "s1"], "photo": pa.nulls(2, pa.string()), "category": ["mug", "toy"],
                         "title": ["Blue", "Rex"], "max_tokens": pa.array([None, None], pa.int32())})  # fmt: skip
    attributes, ds = _run_example("annotate_json", products, engine, tmp_path / "json")
    validator = Draft202012Validator(attributes.structured.json_schema)
    for row in ds:
        assert row["status"] == "ok" and validator.is_valid(json.loads(row["raw_json"]))
        assert row["attributes"] == json.loads(row["raw_json"])
