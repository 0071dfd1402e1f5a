"""Submit a job to a running Ray cluster and exit with the job's own exit status.

    python -m jobs.submit [--address URL] [--working-dir DIR] -- python -m jobs.run --config FILE.yaml ...

What `ray job submit --working-dir DIR -- ENTRYPOINT` does (DIR, by default this directory, is uploaded
and the entrypoint runs on the head, with the `python` first on the PATH of the head's `ray start`), and
the job's log printed as it runs, but the exit status is the entrypoint's: `ray job submit` exits 1 for
every failed job, where cron needs jobs.run's 0/1/2/3. The address is --address, else RAY_ADDRESS.

Ray token authentication: the token is read where Ray reads it (RAY_AUTH_TOKEN, the file
RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token) and sent whenever there is one, so a head with token
authentication on needs nothing more here (`ray job submit` also needs RAY_AUTH_MODE=token). Exit status:
the entrypoint's; 2, one line, when the cluster refuses the job (no token or the wrong one); 3, one line,
when the cluster cannot be reached or the job ended without the entrypoint's status (stopped, or its
runtime environment failed: `ray job logs ID` says why).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time

from jobs.run import EXIT_JOB_ERROR, EXIT_RUN_FAILED, error_line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="The head's job API, http://HEAD:8265 (default: RAY_ADDRESS).")
    parser.add_argument("--working-dir", default=".", help="Directory uploaded for the job (default: .).")
    parser.add_argument("entrypoint", nargs="+", help="The job's command, after --.")
    return parser.parse_args(argv)


def auth_headers() -> dict[str, str]:
    """The Ray token as the header Ray's job API checks, found as `ray get-auth-token` finds it; {} when
    there is none (a cluster without token authentication accepts the job without one)."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return {}
    return {"Authorization": "Bearer " + loader.get_raw_token(ignore_auth_mode=True)}


def exit_status(status: str, driver_exit_code: int | None) -> int:
    """The submitter's exit status for a finished job: the entrypoint's own, or EXIT_RUN_FAILED when the
    job ended without one (stopped, runtime environment failed, entrypoint killed by a signal)."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code is not None and 0 < driver_exit_code < 256:
        return driver_exit_code
    return EXIT_RUN_FAILED


def _sentence(text: str | None) -> str:
    """The first line of a message from Ray, as a sentence."""
    first = (text or "no message").strip().splitlines()[0]
    return first if first.endswith(".") else first + "."


async def _print_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    where = args.address or "RAY_ADDRESS"
    try:
        client = JobSubmissionClient(args.address, headers=auth_headers())
        job_id = client.submit_job(
            entrypoint=shlex.join(args.entrypoint), runtime_env={"working_dir": args.working_dir}
        )
    except AuthenticationError as e:
        print(error_line(
            f"the Ray cluster at {where} refused the job: {_sentence(str(e))} Try its token "
            "(`ray get-auth-token` on the head) in ~/.ray/auth_token or RAY_AUTH_TOKEN here."
        ), file=sys.stderr)  # fmt: skip
        return EXIT_JOB_ERROR
    except ConnectionError as e:
        print(
            error_line(f"{_sentence(str(e))} Try the head's dashboard address, http://HEAD:8265."),
            file=sys.stderr,
        )
        return EXIT_RUN_FAILED
    print(f"phi4mm-batch: job {job_id} submitted to {where}", file=sys.stderr, flush=True)
    try:
        try:
            asyncio.run(_print_logs(client, job_id))
        except RuntimeError as e:  # the log's stream broke (head restarting, a proxy): the status decides
            print(f"phi4mm-batch: the job's log stopped ({e}); waiting for its end", file=sys.stderr)
        while not (info := client.get_job_info(job_id)).status.is_terminal():
            time.sleep(1)  # the log can end a moment before the job's status does
    except KeyboardInterrupt:
        print(f"phi4mm-batch: job {job_id} keeps running; `ray job stop {job_id}` stops it.", file=sys.stderr)
        return 130
    code = exit_status(info.status.value, info.driver_exit_code)
    if code == EXIT_RUN_FAILED and info.driver_exit_code != EXIT_RUN_FAILED:
        said = _sentence(info.message)
        print(error_line(f"job {job_id} ended {info.status.value}: {said} Try `ray job logs {job_id}`."),
              file=sys.stderr)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
