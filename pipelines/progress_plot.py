"""The PNG beside a run's manifest: rows/s and tokens/s over the run, from ``pipelines.progress``'s
samples. Drawn with Pillow (already a dependency), no plotting library."""

from __future__ import annotations

import io

from pipelines.progress import Sample

WIDTH, PANEL_HEIGHT, MARGIN = 900, 260, (70, 30, 20, 40)  # left, top, right, bottom
MAX_POINTS = 120
SMOOTH_S = 20.0  # shortest interval a rate is taken over: rows land a batch at a time


def rates(samples: list[Sample], attr: str) -> list[tuple[float, float]]:
    """(time at the interval's end, per-second rate of ``attr`` over it), over at most MAX_POINTS
    intervals of about equal length and at least SMOOTH_S seconds (an eighth of the run if shorter): single
    2 s samples show when batches land (a sawtooth between 0 and twice the rate), not the rate."""
    if len(samples) < 2 or samples[-1].t <= 0:
        return []
    span = samples[-1].t
    step = max(span / min(MAX_POINTS, len(samples) - 1), min(SMOOTH_S, span / 8))
    points, last = [], samples[0]
    for s in samples[1:]:
        if s.t - last.t >= step or s is samples[-1]:
            if s.t > last.t:
                points.append((s.t, (getattr(s, attr) - getattr(last, attr)) / (s.t - last.t)))
            last = s
    return points


MARK_COLOUR = (120, 120, 120)


def _panel(draw, font, top: int, points: list[tuple[float, float]], span: float, label: str, colour,
           marks: list[tuple[float, str]] = ()) -> None:  # fmt: skip
    left, m_top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top + m_top, WIDTH - right, top + PANEL_HEIGHT - bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for n, (t, name) in enumerate(marks):  # the run's phases (an engine up), dashed, labelled
        x = x0 + min(t / span, 1.0) * (x1 - x0)
        for y in range(int(y0), int(y1), 8):
            draw.line([x, y, x, min(y + 4, y1)], fill=MARK_COLOUR)
        draw.text((x + 3, y0 + 2 + 12 * (n % 3)), name, fill=MARK_COLOUR, font=font)
    draw.text((x0, top + 8), label, fill="black", font=font)
    peak = max((r for _, r in points), default=0.0) or 1.0
    for frac in (0.0, 0.5, 1.0):
        y = y1 - frac * (y1 - y0)
        draw.line([x0 - 4, y, x0, y], fill="black")
        value = frac * peak
        draw.text((4, y - 6), f"{value:,.0f}" if value >= 10 else f"{value:.2g}", fill="black", font=font)
        x = x0 + frac * (x1 - x0)
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 12, y1 + 8), f"{frac * span:.0f} s", fill="black", font=font)
    xy = [(x0 + t / span * (x1 - x0), y1 - r / peak * (y1 - y0)) for t, r in points]
    if len(xy) > 1:
        draw.line(xy, fill=colour, width=2)
    elif xy:
        draw.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=colour)


def progress_png(samples: list[Sample], title: str, marks: list[tuple[float, str]] = ()) -> bytes:
    """Two panels, rows/s and tokens/s (prompt + completion) against seconds since the run started;
    ``marks``: (seconds, label) of the run's phases, drawn in both."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, 2 * PANEL_HEIGHT + 30), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN[0], 8), f"{title} (x: seconds since the run started)", fill="black", font=font)
    span = max(samples[-1].t if samples else 0.0, 1.0)
    _panel(draw, font, 30, rates(samples, "rows"), span, "rows/s (answered by the GPU stage)", (31, 119, 180),
           marks)  # fmt: skip
    _panel(draw, font, 30 + PANEL_HEIGHT, rates(samples, "tokens"), span, "tokens/s (prompt + completion)",
           (214, 39, 40), marks)  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
