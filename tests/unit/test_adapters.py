"""The job's own LoRA adapters: the checks of schemas/adapters.py and the resolver of
actors/engines/adapters.py (local folders, the test S3 server, the per-node cache)."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from actors.engines.adapters import lora_rank_of, resolve_adapters
from schemas.adapters import AdaptersConfig, check_adapter_dir, target_problem
from schemas.errors import JobError
from schemas.job import ModelConfig
from schemas.model import PHI4MM
from tests.helpers import ADAPTER_TARGETS as TARGETS
from tests.helpers import REPO, write_adapter


def _refused(folder, *needles, max_bytes=10**6):
    with pytest.raises(JobError) as e:
        check_adapter_dir("model.adapters.speech", folder, max_bytes)
    message = str(e.value)
    assert message.startswith("model.adapters.speech ") and "\n" not in message
    assert "Try " in message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_lora_folder_passes_and_reports_its_rank(tmp_path):
    info = check_adapter_dir("model.adapters.speech", write_adapter(tmp_path / "a", r=320), 10**6)
    assert info.rank == 320 and info.target_modules == tuple(TARGETS) and info.bytes > 100


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"r": 1024}, "r=1024"),
        ({"r": 0}, "r=0"),
        ({"r": "8"}, "r='8'"),
        ({"r": 8, "rank_pattern": {"o_proj": 600}}, "rank_pattern"),
        ({"r": 8, "rank_pattern": ["o_proj"]}, "rank_pattern"),
        ({"peft_type": "IA3"}, "'IA3'"),
        ({"target_modules": ["q_proj", "o_proj"]}, "['q_proj']"),
        ({"target_modules": ["vision_encoder.qkv_proj"]}, "vision_encoder.qkv_proj"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": r".*\.q_proj"}, "matches none"),
        ({"target_modules": "(unclosed"}, "not a valid regex"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_a_bad_adapter_config_is_refused_naming_what(tmp_path, config, needle):
    _refused(write_adapter(tmp_path / "a", **config), needle)


def test_missing_files_and_too_big_are_refused(tmp_path):
    _refused(tmp_path / "nowhere", "does not exist")
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    _refused(folder, "no adapter weights")
    (folder / "adapter_model.bin").write_bytes(b"w")  # the older weights file is accepted
    assert check_adapter_dir("k", folder, 10**6).rank == 8
    (folder / "adapter_config.json").unlink()
    _refused(folder, "no adapter_config.json")
    (folder / "adapter_config.json").write_text("{not json")
    _refused(folder, "not JSON")
    big = write_adapter(tmp_path / "big", weights=b"w" * 5000)
    _refused(big, "max_bytes (4000)", max_bytes=4000)


def test_regex_target_modules_must_match_a_projection():
    # the tiny transformers checkpoint's regex and the original checkpoint's config.json one
    assert (
        target_problem(r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))")
        is None
    )
    assert target_problem(r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))") is None
    assert target_problem(r".*o_proj") is None
    assert "matches none" in target_problem(r".*vision_encoder.*")
    assert target_problem(["self_attn.qkv_proj", "down_proj"]) is None
    assert target_problem(["layers"]) is not None  # a list entry must name a module, not a prefix


def test_adapters_config_refuses_unknown_keys_and_lora_off():
    with pytest.raises(ValidationError, match="visoin"):
        AdaptersConfig(visoin="/a")
    with pytest.raises(ValidationError, match="model.adapters.speech is set but model.use_lora is false"):
        ModelConfig(path="/m", use_lora=False, adapters={"speech": "/a"})
    assert all(f.description for f in AdaptersConfig.model_fields.values())


def test_local_adapters_resolve_to_their_folders(tiny_model, tmp_path):
    model = ModelConfig(path=tiny_model)
    assert {a: str(p) for a, p in resolve_adapters(model).items()} == {
        a: f"{tiny_model}/{PHI4MM.adapter_dir(a)}" for a in ("vision", "speech")
    }  # the checkpoint's own, as today
    custom = write_adapter(tmp_path / "mine", r=64)
    dirs = resolve_adapters(ModelConfig(path=tiny_model, adapters={"speech": str(custom)}))
    assert dirs["speech"] == custom and str(dirs["vision"]) == f"{tiny_model}/{PHI4MM.vision_lora_dir}"
    assert lora_rank_of(dirs) == 64  # the largest adapter in use sets the engine's bound
    write_adapter(custom, r=1024)
    with pytest.raises(JobError, match="model.adapters.speech"):
        resolve_adapters(ModelConfig(path=tiny_model, adapters={"speech": str(custom)}))


def _upload(s3, prefix: str, folder) -> str:
    for f in folder.iterdir():
        s3.put(f"{prefix}/{f.name}", f.read_bytes())
    return s3.url(prefix)


def _gets(s3) -> list[str]:
    return [path for method, path, query, _ in s3.server.requests if method == "GET" and not query]


def test_a_remote_adapter_is_copied_once_and_again_when_it_changes(s3, tiny_model, tmp_path):
    url = _upload(s3, "adapters/speech", write_adapter(tmp_path / "v1", weights=b"1" * 300))
    model = ModelConfig(path=tiny_model, adapters={"speech": url, "cache_dir": str(tmp_path / "cache")})
    first = resolve_adapters(model, s3.storage)["speech"]
    assert first.parent == tmp_path / "cache"
    assert (first / "adapter_model.safetensors").read_bytes() == b"1" * 300
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no partial copy left
    if s3.server is not None:
        s3.server.clear_requests()
    assert resolve_adapters(model, s3.storage)["speech"] == first  # the cache is reused
    if s3.server is not None:
        assert _gets(s3) == []  # listed, not downloaded again
    # a new upload under the same URL (re-trained weights) is fetched again
    _upload(s3, "adapters/speech", write_adapter(tmp_path / "v2", weights=b"2" * 400, r=16))
    second = resolve_adapters(model, s3.storage)["speech"]
    assert second != first and (second / "adapter_model.safetensors").read_bytes() == b"2" * 400
    assert lora_rank_of(resolve_adapters(model, s3.storage)) == 16


def test_a_remote_adapter_too_big_or_missing_is_refused_before_download(s3, tiny_model, tmp_path):
    url = _upload(s3, "big", write_adapter(tmp_path / "big", weights=b"w" * 5000))
    cache = tmp_path / "cache"
    model = ModelConfig(path=tiny_model, adapters={"vision": url, "max_bytes": 4000, "cache_dir": str(cache)})
    if s3.server is not None:
        s3.server.clear_requests()
    with pytest.raises(JobError, match=r"model.adapters.vision s3://.*max_bytes \(4000\)"):
        resolve_adapters(model, s3.storage)
    if s3.server is not None:
        assert _gets(s3) == []
    assert not cache.exists()
    missing = ModelConfig(path=tiny_model, adapters={"vision": s3.url("nothing-here")})
    with pytest.raises(JobError, match="holds no files"):
        resolve_adapters(missing, s3.storage)


def test_a_remote_adapter_url_that_cannot_be_opened_is_a_job_error(tiny_model, tmp_path):
    model = ModelConfig(path=tiny_model, adapters={"speech": "nosuchscheme://host/adapter"})
    with pytest.raises(
        JobError, match=r"^model.adapters.speech nosuchscheme://host/adapter cannot be opened.*Try"
    ):
        resolve_adapters(model)


def test_the_default_cache_is_private_to_the_user(s3, tiny_model, tmp_path, monkeypatch):
    import os
    import stat
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = _upload(s3, "a", write_adapter(tmp_path / "a"))
    local = resolve_adapters(ModelConfig(path=tiny_model, adapters={"vision": url}), s3.storage)["vision"]
    assert local.parent == tmp_path / f"phi4mm-adapters-{os.getuid()}"
    assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700


def test_a_cache_another_user_owns_is_refused(s3, tiny_model, tmp_path, monkeypatch):
    import os

    (tmp_path / "cache").mkdir()
    url = _upload(s3, "a", write_adapter(tmp_path / "a"))
    monkeypatch.setattr(
        os, "getuid", lambda: os.stat(tmp_path / "cache").st_uid + 1
    )  # as seen by another user
    model = ModelConfig(path=tiny_model, adapters={"vision": url, "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(JobError, match="belongs to another user.*Try model.adapters.cache_dir"):
        resolve_adapters(model, s3.storage)


def test_a_job_mistake_is_reported_before_a_remote_adapter_is_downloaded(s3, tiny_model, tmp_path):
    from pipelines.validate import validate_job
    from tests.helpers import make_config

    url = _upload(s3, "adapters/early", write_adapter(tmp_path / "a"))
    cache = tmp_path / "cache"
    config = make_config(
        tiny_model, tmp_path, input={"path": str(tmp_path / "missing.parquet")},
        model={"adapters": {"speech": url, "cache_dir": str(cache)}}, storage=s3.storage.model_dump(),
    )  # fmt: skip
    with pytest.raises(JobError, match="input.path"):
        validate_job(config)
    assert not cache.exists() or not any(cache.iterdir())  # nothing was copied


def test_a_regex_that_backtracks_is_refused_in_bounded_time():
    # (.*.*.*)*X hung validation; (.*.*.*)*qkv_proj matches a projection at once but backtracks on every
    # other module name, where PEFT's load would hang. Run in a child so that a hang fails, not blocks.
    code = (
        "import schemas.adapters as a; a.REGEX_TIME_LIMIT_S = 1.0; "
        "print(a.target_problem('(.*.*.*)*X')); print(a.target_problem('(.*.*.*)*qkv_proj'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("takes more than 1 s to match" in line for line in lines), done
