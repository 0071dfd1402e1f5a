"""The one exception for a mistake in the job itself (config, input, model or output), as opposed to a bad
row (which becomes an error row, see ``schemas.rows``)."""

from __future__ import annotations


class JobError(Exception):
    """Stops the run before it touches any output: ``python -m jobs.run`` prints this one-line message
    (it names the file, key or path and says what to do, ending in "Try ...") and exits with status 2."""
