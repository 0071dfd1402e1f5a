"""A finished run's config, written back from its manifest as YAML for ``python -m jobs.run --config``.

    python -m jobs.from_manifest OUT/_run-<run_id>.json > job.yaml
    python -m jobs.from_manifest OUT/_run-<run_id>.json --set engine.env.HF_TOKEN="$HF_TOKEN" > job.yaml
    python -m jobs.run --config job.yaml --output OTHER_OUT     # the run's config again

Prints the manifest's ``provenance.config`` (the config as the run used it: defaults included, ``--set``
applied, paths absolute), validated again, as YAML. Secrets were replaced by ``***`` in the manifest, and
``provenance.config_redacted`` names their keys: each must be given again with ``--set KEY=VALUE`` (VALUE
read as YAML, as ``jobs.run`` reads it; a section holding the key will do), or the command refuses (exit 2,
one line naming them). A note on stderr says when the config hashes differently from the run's
(``provenance.config_sha256``): another phi4mm-batch version reads it differently, or a ``--set`` changed
more than the secrets. Exit status 0, or 2 with one line on stderr.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from jobs.run import EXIT_JOB_ERROR, SET_OPTION, _Parser, error_line, validation_lines
from pipelines.provenance import config_hash
from schemas.errors import JobError
from schemas.job import JobConfig
from schemas.redact import redact
from schemas.storage import filesystem_for


def read_manifest(path: str) -> dict:
    """The manifest ``_run-<run_id>.json`` at ``path`` (a local path or a URL of the output's store)."""
    try:
        fs, where = filesystem_for(path)
        with fs.open_input_stream(where) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise JobError(
            f"{path}: cannot read a run manifest ({' '.join(str(e).split())}). Try the _run-<run_id>.json "
            "file beside a run's output."
        ) from None


def run_config(path: str, sets: list[tuple[str, object]] = ()) -> tuple[JobConfig, dict]:
    """The config recorded in the manifest at ``path`` with ``sets`` (KEY, VALUE) applied, validated as
    ``jobs.run`` validates a config file, and the manifest's provenance. A ``JobError`` when the manifest
    holds no config or a redacted key is not given again; pydantic's ValidationError for a bad --set."""
    provenance = read_manifest(path).get("provenance") or {}
    if "config" not in provenance:
        raise JobError(
            f"{path} records no config (written by phi4mm-batch before manifests held one). Try the "
            "manifest of a newer run."
        )
    given = [key for key, _ in sets]
    missing = [
        k
        for k in provenance.get("config_redacted", [])
        if not any(f"{k}.".startswith(f"{g}.") for g in given)
    ]
    if missing:
        raise JobError(
            f"{path}: the run's config had secrets redacted, so it cannot be written back as it was: "
            f"{', '.join(missing)}. Try again with --set KEY=VALUE for each, e.g. --set {missing[0]}=..."
        )
    with tempfile.TemporaryDirectory() as tmp:  # read back exactly as `jobs.run --config FILE` reads it
        file = Path(tmp) / "config.yaml"
        file.write_text(yaml.safe_dump(provenance["config"], sort_keys=False), encoding="utf-8")
        return JobConfig.from_yaml(file, dict(sets)), provenance


def config_yaml(config: JobConfig, header: str = "") -> str:
    """``config`` as a YAML job file: every field, in the schema's order, after ``header``'s comment lines."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m jobs.from_manifest", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="The run's _run-<run_id>.json, beside its output.")
    parser.add_argument(
        "--set",
        **SET_OPTION,
        help="Give a redacted secret again (the manifest's provenance.config_redacted names them), or change "
        "any key, e.g. engine.env.HF_TOKEN=hf_... ; VALUE is read as YAML. Repeatable.",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        config, provenance = run_config(args.manifest, args.sets)
    except (JobError, ValidationError) as e:  # one line each, as jobs.run says them
        bad = isinstance(e, ValidationError)
        lines = validation_lines(e, args.manifest, args.sets) if bad else [error_line(str(e))]
        print("\n".join(lines), file=sys.stderr)
        return EXIT_JOB_ERROR
    project = provenance.get("project") or {}
    code = f"phi4mm-batch {project.get('version')}, commit {project.get('commit')}"
    code += " with uncommitted changes" if project.get("dirty") else ""
    sys.stdout.write(
        config_yaml(config, f"The config of the run recorded in {redact(args.manifest)}\nIts code: {code}")
    )
    if config_hash(config) != provenance.get("config_sha256"):
        print(
            "phi4mm-batch: note: this config hashes differently from the run's (provenance.config_sha256): "
            "another phi4mm-batch version reads it differently, or a --set changed more than the secrets.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
