"""A run's progress: a log line every ``progress.every_s`` seconds when nobody watches a terminal (as
under ``ray job submit``), and the run's rows/s and tokens/s over time for the PNG beside its manifest.

    monitor = ProgressMonitor(poll, total_rows, every_s=60, log=not sys.stderr.isatty()).start()
    ...
    monitor.stop(); png = progress_png(monitor.samples)

``poll`` returns each GPU actor's counts so far (``actors.generate.GenerateRows`` reports them to the
run's ledger as stage "progress"): rows, ok, error_codes, prompt_tokens, completion_tokens. Plain
class, its clock injectable: a unit test drives it without Ray or threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("phi4mm_batch.progress")

SAMPLE_S = 2.0  # how often the counts are read (the PNG's resolution); log lines come every every_s


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the monitor started
    rows: int
    tokens: int  # prompt + completion
    errors: Counter = field(default_factory=Counter)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class ProgressMonitor:
    def __init__(
        self,
        poll: Callable[[], dict[str, dict]],
        total: int,
        every_s: float = 60.0,
        log: bool = True,
        clock: Callable[[], float] = time.monotonic,
        engines: Callable[[], dict[str, dict]] | None = None,
        wall: Callable[[], float] = time.time,
    ):
        self.poll, self.total, self.every_s, self.log, self.clock = poll, total, every_s, log, clock
        self.engines = engines  # each GPU actor's engine stats, for the useful-work part of the lines
        self.wall = wall  # the clock of the actors' reports (starting_since)
        self.started = clock()
        self.started_wall = wall()  # engines report wall-clock times (ready_at): the plot's marks
        self.samples: list[Sample] = [Sample(0.0, 0, 0)]
        self._last_line = self.started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> Sample:
        """Read the actors' counts now and keep them; a failed read keeps the last sample."""
        try:
            actors = self.poll()
        except Exception as e:  # the ledger briefly unreachable must not end the run
            logger.debug("progress: counts not read (%s)", e)
            return self.samples[-1]
        errors = Counter()
        for counts in actors.values():
            errors.update(counts.get("error_codes", {}))
        sample = Sample(
            t=self.clock() - self.started,
            rows=sum(c.get("rows", 0) for c in actors.values()),
            tokens=sum(c.get("prompt_tokens", 0) + c.get("completion_tokens", 0) for c in actors.values()),
            errors=errors,
        )
        self.samples.append(sample)
        return sample

    def line(self, now: Sample) -> str:
        """``progress: 120/400 rows (30%), 2.10 rows/s, ETA 2m13s, errors 3 (MEDIA_NOT_FOUND 2, ...)``;
        rows/s over the last minute (over the whole run before that), ETA at that rate."""
        recent = [s for s in self.samples if now.t - s.t <= 60.0] or [now]
        first = recent[0] if now.t - recent[0].t >= 10.0 else self.samples[0]
        rate = (now.rows - first.rows) / (now.t - first.t) if now.t > first.t else 0.0
        left = max(self.total - now.rows, 0)
        eta = _duration(left / rate) if rate > 0 else "unknown"
        share = f" ({100 * now.rows / self.total:.0f}%)" if self.total else ""
        n_errors = sum(now.errors.values())
        codes = ", ".join(f"{code} {n}" for code, n in now.errors.most_common(3))
        more = ", ..." if len(now.errors) > 3 else ""
        errors = f"errors {n_errors} ({codes}{more})" if n_errors else "errors 0"
        return f"progress: {now.rows}/{self.total} rows{share}, {rate:.2f} rows/s, ETA {eta}, {errors}"

    def engines_part(self) -> str:
        """``; engines: 1 up, 1 starting for 35 s, KV peak 63%, waiting max 40, preempted 3`` from what the
        GPU actors last reported: an actor says when its engine began starting, then its engine's stats
        (vLLM's useful-work figures, ``actors.engines.vllm.stats``). Empty before any actor reported."""
        try:
            engines = list((self.engines() if self.engines else {}).values())
        except Exception as e:  # the ledger briefly unreachable: the line without it
            logger.debug("progress: engine stats not read (%s)", e)
            return ""
        starting = [e["starting_since"] for e in engines if "starting_since" in e]
        works = [e["work"] for e in engines if e.get("work")]
        parts = [f"{len(engines) - len(starting)} up"] if len(engines) > len(starting) else []
        if starting:
            parts.append(f"{len(starting)} starting for {_duration(self.wall() - min(starting))}")
        if works:
            parts += [
                f"KV peak {100 * max(w['kv_cache_usage_max'] for w in works):.0f}%",
                f"waiting max {max(w['waiting_max'] for w in works)}",
                f"preempted {sum(w['preemptions'] for w in works)}",
            ]
        return f"; engines: {', '.join(parts)}" if parts else ""

    def final_line(self) -> str:
        """The run's last counts, logged when the monitor stops: the periodic lines may end minutes before."""
        now = self.samples[-1]
        rate = now.rows / now.t if now.t > 0 else 0.0
        n_errors = sum(now.errors.values())
        return (
            f"progress: done, {now.rows}/{self.total} rows in {_duration(now.t)}, {rate:.2f} rows/s on average, "
            f"errors {n_errors}"
        )

    def tick(self) -> None:
        """One sample; a log line when ``every_s`` has passed since the last one (and ``log``)."""
        now = self.sample()
        if self.log and self.clock() - self._last_line >= self.every_s:
            self._last_line = self.clock()
            logger.info(self.line(now) + self.engines_part())

    def start(self) -> ProgressMonitor:
        def run():
            while not self._stop.wait(min(SAMPLE_S, self.every_s)):
                self.tick()

        self._thread = threading.Thread(target=run, name="progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take a last sample (the run's final counts); again: nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if self.log:
            logger.info(self.final_line())
