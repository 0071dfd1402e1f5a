"""A run can be reproduced from its manifest: the config as the run used it (``--set`` applied, defaults
included, secrets redacted), the command line and the project's commit, and `python -m jobs.from_manifest`
writing that config back as a YAML file that `jobs.run --config` reads as the same config."""

import json
import shutil
import subprocess

import pytest
import yaml

from jobs.from_manifest import main as from_manifest
from jobs.run import load_config, main, parse_args
from pipelines.provenance import COMMIT_VARIABLE, command, config_hash, project, resolved_config
from schemas.job import JobConfig
from tests.helpers import REPO, make_config
from tests.unit.test_cli import _all_done, job  # noqa: F401  (job: a fixture)

SECRET = "hf_d0n0tl3akm3"
SIGNED = "see https://cdn.example.com/guide.png?X-Amz-Signature=f00dfeed0123 first."


def _run(argv: list[str], out, capsys) -> tuple[dict, str]:
    """``jobs.run`` with ``argv`` over an output that holds every row already (no Ray, seconds): the
    manifest it wrote and that file's text."""
    _all_done(out)
    assert main(argv) == 0
    run_id = json.loads(capsys.readouterr().out.split("SUMMARY_JSON ", 1)[1])["run_id"]
    text = (out / f"_run-{run_id}.json").read_text()
    return json.loads(text), text


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_the_manifest_holds_the_resolved_config_the_command_and_the_commit(job, capsys):  # noqa: F811
    cfg, out = job
    argv = ["--config", cfg, "--set", "engine.max_model_len=4096", "--set", f"engine.env.HF_TOKEN={SECRET}",
            "--set", f"prompt.system={SIGNED}"]  # fmt: skip
    manifest, text = _run(argv, out, capsys)
    prov = manifest["provenance"]
    config = prov["config"]
    assert config["engine"]["max_model_len"] == 4096  # --set applied
    assert config["media"]["max_image_pixels"] == 80_000_000  # defaults included
    assert config["input"]["path"].startswith("/") and config["output"]["path"] == str(out)
    assert config["engine"]["env"] == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "***",
    }
    assert config["prompt"]["system"] == "see https://cdn.example.com/guide.png?X-Amz-Signature=*** first."
    assert prov["config_redacted"] == ["prompt.system", "engine.env.HF_TOKEN"]
    assert SECRET not in text and "f00dfeed0123" not in text  # nowhere in the manifest
    assert prov["config_sha256"] == config_hash(load_config(parse_args(argv)))  # the hash as before
    assert prov["command"]["argv"] == [
        *argv[:4],
        "--set",
        "engine.env.HF_TOKEN=***",
        "--set",
        "prompt.system=***",
    ]
    assert prov["command"]["cwd"]
    assert prov["project"]["commit"] == _git("rev-parse", "HEAD").strip()
    assert prov["project"]["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    assert prov["project"]["version"] == prov["versions"]["phi4mm-batch"]


def test_the_config_written_back_is_the_runs_config(job, tmp_path, capsys):  # noqa: F811
    cfg, out = job
    argv = ["--config", cfg, "--set", "engine.max_model_len=4096", "--retry-errors", "IMAGE_DECODE_ERROR"]
    manifest, _ = _run(argv, out, capsys)
    path = str(out / f"_run-{manifest['run_id']}.json")
    assert from_manifest([path]) == 0
    written, notes = capsys.readouterr()
    assert not notes  # it hashes as the run's config did
    (tmp_path / "again.yaml").write_text(written)
    again = load_config(
        parse_args(["--config", str(tmp_path / "again.yaml")])
    )  # `jobs.run --config` reads it
    assert again == load_config(parse_args(argv)) and again.engine.max_model_len == 4096
    assert again.output.retry_errors == ["IMAGE_DECODE_ERROR"]  # the options are in the config too
    assert config_hash(again) == manifest["provenance"]["config_sha256"]


def test_a_redacted_config_is_written_back_only_with_its_secrets_given_again(job, tmp_path, capsys):  # noqa: F811
    cfg, out = job
    argv = ["--config", cfg, "--set", f"engine.env.HF_TOKEN={SECRET}", "--set", f"prompt.system={SIGNED}"]
    manifest, _ = _run(argv, out, capsys)
    path = str(out / f"_run-{manifest['run_id']}.json")
    assert from_manifest([path]) == 2
    stdout, stderr = capsys.readouterr()
    assert not stdout and len(stderr.strip().splitlines()) == 1
    assert "prompt.system, engine.env.HF_TOKEN" in stderr and "Try again with --set" in stderr
    assert from_manifest([path, "--set", f"engine.env.HF_TOKEN={SECRET}"]) == 2  # one still missing
    assert "prompt.system." in capsys.readouterr().err
    # a section holding the key gives it too
    assert from_manifest([path, "--set", f"prompt={{system: '{SIGNED}'}}",
                          "--set", f"engine.env={{HF_HUB_OFFLINE: '1', VLLM_CPU_KVCACHE_SPACE: '1', HF_TOKEN: {SECRET}}}"]) == 0  # fmt: skip
    written, notes = capsys.readouterr()
    assert not notes  # the same secrets (env in the same order: it is the environment's): the run's hash
    assert JobConfig.from_yaml(_file(tmp_path, written)) == load_config(parse_args(argv))
    others = ["--set", "engine.env.HF_TOKEN=other", "--set", "prompt.system=hi"]
    assert from_manifest([path, *others]) == 0
    assert "hashes differently" in capsys.readouterr().err
    assert from_manifest([path, *others, "--set", "engine.max_model_len=lots"]) == 2
    assert "engine.max_model_len" in capsys.readouterr().err


def _file(tmp_path, text: str):
    path = tmp_path / "written.yaml"
    path.write_text(text)
    return path


def test_an_older_or_unreadable_manifest_is_one_line(tmp_path, capsys):
    old = tmp_path / "_run-old.json"
    old.write_text(json.dumps({"run_id": "old", "provenance": {"config_sha256": "0" * 64}}))
    for path, needle in (
        (old, "records no config"),
        (tmp_path / "missing.json", "cannot read a run manifest"),
    ):
        assert from_manifest([str(path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1


def test_every_section_round_trips_and_only_secrets_are_hidden(tiny_model, tmp_path):
    config = make_config(
        tiny_model, tmp_path, task={"preset": "translate", "target_language": "Greek"},
        structured={"json_schema": {"type": "object", "properties": {"api_key": {"type": "string"}}}},
        confidence=True, input={"allowed_media_roots": ["s3://bucket/media/"]},
        engine={"env": {"AWS_SECRET_ACCESS_KEY": "abc", "WANDB_API_KEY": "def", "VLLM_CPU_KVCACHE_SPACE": "1",
                        "EMPTY_TOKEN": ""}},
        resources={"preprocess": {"concurrency": [1, 4]}},
    )  # fmt: skip
    shown, hidden = resolved_config(config)
    assert hidden == ["engine.env.AWS_SECRET_ACCESS_KEY", "engine.env.WANDB_API_KEY"]
    assert shown["structured"]["json_schema"]["properties"] == {
        "api_key": {"type": "string"}
    }  # a schema's key
    assert shown["sampling"]["max_tokens"] == 8  # a field named like a secret is no secret
    expected = config.model_dump(mode="json")
    for key in ("AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"):
        assert shown["engine"]["env"].pop(key) == "***"
        expected["engine"]["env"].pop(key)
    assert shown == expected  # everything else as it is
    config.engine.env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    shown, hidden = resolved_config(config)
    assert not hidden
    path = _file(tmp_path, yaml.safe_dump(shown, sort_keys=False))  # a schema's keys keep their order
    assert JobConfig.from_yaml(path) == config and config_hash(JobConfig.from_yaml(path)) == config_hash(
        config
    )


def test_the_command_hides_what_the_config_hid():
    hidden = ["engine.env.HF_TOKEN", "input.allowed_media_roots"]
    argv = ["--config", "job.yaml", "--set=engine.env.HF_TOKEN=x", "--set", "engine={env: {HF_TOKEN: x}}",
            "--set", "engine.max_model_len=4096", "--set", "input.allowed_media_roots=[s3://b/]",
            "--input", "https://user:pw@host/in.parquet?sig=abc"]  # fmt: skip
    assert command(argv, hidden)["argv"] == [
        "--config", "job.yaml", "--set=engine.env.HF_TOKEN=***", "--set", "engine=***",
        "--set", "engine.max_model_len=4096", "--set", "input.allowed_media_roots=***",
        "--input", "https://***@host/in.parquet?sig=***",
    ]  # fmt: skip


def _checkout(root, head: str, refs: dict[str, str] | None = None, packed: str = ""):
    git = root / ".git"
    git.mkdir(parents=True)
    (git / "HEAD").write_text(head + "\n")
    for name, sha in (refs or {}).items():
        (git / name).parent.mkdir(parents=True, exist_ok=True)
        (git / name).write_text(sha + "\n")
    if packed:
        (git / "packed-refs").write_text(packed)
    return root


def test_the_commit_is_read_from_the_checkouts_files(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no git on the PATH: the commit all the same
    a, b = "a" * 40, "b" * 40
    loose = _checkout(tmp_path / "loose", "ref: refs/heads/main", {"refs/heads/main": a})
    packed = _checkout(tmp_path / "packed", "ref: refs/heads/nightly",
                       packed=f"# pack-refs with: peeled\n{b} refs/heads/nightly\n{a} refs/tags/v1\n")  # fmt: skip
    detached = _checkout(tmp_path / "detached", b)
    # a worktree: .git is a file naming its git directory, whose refs are the common directory's
    common = _checkout(tmp_path / "main", "ref: refs/heads/main", {"refs/heads/wt": a})
    (common / ".git" / "worktrees" / "wt").mkdir(parents=True)
    (common / ".git" / "worktrees" / "wt" / "HEAD").write_text("ref: refs/heads/wt\n")
    (common / ".git" / "worktrees" / "wt" / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {common / '.git' / 'worktrees' / 'wt'}\n")
    found = {p.name: project(p) for p in (loose, packed, detached, tmp_path / "wt")}
    assert {k: v["commit"] for k, v in found.items()} == {"loose": a, "packed": b, "detached": b, "wt": a}
    assert all(v["dirty"] is None for v in found.values())  # that needs git
    assert {v["commit_from"] for v in found.values()} == {"git"}
    (tmp_path / "copy").mkdir()  # not a checkout (ray job submit's copy of the working directory: no .git)
    monkeypatch.delenv(COMMIT_VARIABLE, raising=False)
    assert project(tmp_path / "copy")["commit"] is None and project(tmp_path / "copy")["version"]
    monkeypatch.setenv(COMMIT_VARIABLE, b)  # what the submitter says it is
    assert project(tmp_path / "copy") | {"version": None} == {
        "version": None, "root": str(tmp_path / "copy"), "commit": b, "commit_from": COMMIT_VARIABLE, "dirty": None
    }  # fmt: skip
    assert project(loose)["commit"] == a  # a checkout's own files come first


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_a_dirty_tree_is_said_so(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (root / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert project(root)["commit"] == head and project(root)["dirty"] is False
    (root / "untracked.txt").write_text("")
    assert project(root)["dirty"] is False  # only tracked files count
    (root / "a.py").write_text("x = 2\n")
    assert project(root)["dirty"] is True
