"""Shared ending of every benchmark: write the figures as JSON and print them as a table."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(benchmark: str, figures: dict, out: str | None = None, **context) -> Path:
    result = {"benchmark": benchmark, "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              **context, "figures": figures}  # fmt: skip
    path = Path(out) if out else RESULTS / f"{benchmark}-{platform.node() or 'host'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    width = max(map(len, figures))
    print(f"{'figure':<{width}}  value")
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(f"wrote {path}")
    return path
