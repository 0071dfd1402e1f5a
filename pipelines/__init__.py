"""Pipeline composition: which stages run, how Ray schedules them, and the Parquet I/O around them.

Importing this package is cheap: Ray, vLLM and torch are imported only when a pipeline runs.
"""


def run_pipeline(config, run_id):
    from pipelines.phi4mm import run_pipeline as _run

    return _run(config, run_id)


__all__ = ["run_pipeline"]
