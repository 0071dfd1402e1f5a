"""The PNG beside a run's manifest: rows/s and tokens/s over the run, from ``pipelines.progress``'s
samples. Drawn with Pillow (already a dependency), no plotting library."""

from __future__ import annotations

import io

from pipelines.progress import Sample

WIDTH, PANEL_HEIGHT, MARGIN = 900, 260, (70, 30, 20, 40)  # left, top, right, bottom
MAX_POINTS = 120


def rates(samples: list[Sample], attr: str) -> list[tuple[float, float]]:
    """(time at the interval's end, per-second rate of ``attr`` over it), over at most MAX_POINTS
    intervals of about equal length (single 2 s samples would show when blocks land, not the rate)."""
    if len(samples) < 2 or samples[-1].t <= 0:
        return []
    step = samples[-1].t / min(MAX_POINTS, len(samples) - 1)
    points, last = [], samples[0]
    for s in samples[1:]:
        if s.t - last.t >= step or s is samples[-1]:
            if s.t > last.t:
                points.append((s.t, (getattr(s, attr) - getattr(last, attr)) / (s.t - last.t)))
            last = s
    return points


def _panel(draw, font, top: int, points: list[tuple[float, float]], span: float, label: str, colour) -> None:
    left, m_top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top + m_top, WIDTH - right, top + PANEL_HEIGHT - bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
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


def progress_png(samples: list[Sample], title: str) -> bytes:
    """Two panels, rows/s and tokens/s (prompt + completion) against seconds since the run started."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, 2 * PANEL_HEIGHT + 30), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN[0], 8), f"{title} (x: seconds since the run started)", fill="black", font=font)
    span = max(samples[-1].t if samples else 0.0, 1.0)
    _panel(draw, font, 30, rates(samples, "rows"), span, "rows/s (answered by the GPU stage)", (31, 119, 180))
    _panel(draw, font, 30 + PANEL_HEIGHT, rates(samples, "tokens"), span, "tokens/s (prompt + completion)",
           (214, 39, 40))  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
