"""Charts as inline SVG, drawn on the server: no chart library, nothing for the browser to fetch.

Each function returns one `<svg>` element (escaped text, presentation attributes only, colours
from the stylesheet's classes, so a strict Content-Security-Policy holds) with a <title> and a
<desc> that says in words what the chart shows, for screen readers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

# viewBox sizes near the size a chart is shown at (wide: the page's width; narrow: half of it),
# so its text stays the stylesheet's size instead of being scaled with the picture.
WIDE = 1160
NARROW = 540
HEIGHT = 240
LEFT = 52
RIGHT = 12
TOP = 30
BOTTOM = 30


def _chart_id(title: str) -> str:
    # From the title, so a page's charts (each titled differently) have distinct, stable ids.
    return "chart-" + hashlib.sha256(title.encode()).hexdigest()[:10]


def bucket_label(start: float, bucket_s: int) -> str:
    moment = datetime.fromtimestamp(start, UTC)
    return moment.strftime("%H:%M") if bucket_s < 3600 else moment.strftime("%m-%d %H:00")


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def _count_scale(value: float) -> float:
    """The top of a count axis with four whole-numbered steps (3 -> 4, 11 -> 20, 230 -> 400)."""
    quarter = max(1.0, value / 4)
    exponent = 10 ** math.floor(math.log10(quarter))
    for step in (1, 2, 2.5, 5, 10):
        if quarter <= step * exponent and (step * exponent) % 1 == 0:
            return 4 * step * exponent
    return 40 * exponent


def _number(value: float, *, money: bool = False, percent: bool = False) -> str:
    if percent:
        return f"{value * 100:.0f}%"
    if money:
        return f"${value:.4f}" if value < 1 else f"${value:,.2f}"
    return f"{value:g}" if value < 10_000 else f"{value / 1000:.0f}k"


def _open(title: str, desc: str, width: int, height: int = HEIGHT) -> str:
    # The title is for assistive technology and tooltips; the page's heading shows it on screen.
    ident = _chart_id(title)
    return (f'<svg class="chart w{width}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-labelledby="{ident}-t {ident}-d" preserveAspectRatio="xMidYMid meet">'
            f'<title id="{ident}-t">{escape(title)}</title><desc id="{ident}-d">{escape(desc)}</desc>')


def _y_axis(top_value: float, plot_h: float, width: int, *, money: bool = False,
            percent: bool = False) -> list[str]:
    parts = []
    for i in range(5):
        value = top_value * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{escape(_number(value, money=money, percent=percent))}</text>')
    return parts


def _x_labels(labels: Sequence[str], slot: float, plot_h: float, width: int) -> list[str]:
    longest = max((len(label) for label in labels), default=1)
    every = max(1, math.ceil(len(labels) / max(1, width // (7 * longest + 24))))
    parts = []
    for i, label in enumerate(labels):
        last = i == len(labels) - 1
        # The last bucket (now) is always labelled; a regular label too close to it is dropped.
        if (i % every == 0 and len(labels) - 1 - i >= every) or last:
            x = LEFT + slot * (i + 1) if last else LEFT + slot * (i + 0.5)
            anchor = "end" if last else "middle"
            parts.append(f'<text class="axis" x="{x:.1f}" y="{TOP + plot_h + 18:.1f}" text-anchor="{anchor}">'
                         f'{escape(label)}</text>')
    return parts


def stacked_bars(*, title: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]],
                 width: int = WIDE) -> str:
    """Bars per time bucket, stacked by series: (name, css key, one value per label)."""
    totals = [sum(values[i] for _, _, values in series) for i in range(len(labels))]
    summary = ", ".join(f"{name}: {sum(values):g}" for name, _, values in series)
    head = _open(title, f"Over {len(labels)} time buckets. Totals: {summary}.", width)
    plot_h = HEIGHT - TOP - BOTTOM
    top_value = _count_scale(max(totals, default=0))
    slot = (width - LEFT - RIGHT) / max(1, len(labels))
    parts = [head, *_y_axis(top_value, plot_h, width)]
    for i in range(len(labels)):
        y: float = TOP + plot_h
        for name, key, values in series:
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top_value
            y -= h
            parts.append(f'<rect class="bar s-{escape(key)}" x="{LEFT + slot * i + slot * 0.12:.1f}" y="{y:.1f}" '
                         f'width="{max(1.0, slot * 0.76):.1f}" height="{h:.1f}">'
                         f'<title>{escape(labels[i])}: {escape(name)} {value:g}</title></rect>')
    parts.extend(_x_labels(labels, slot, plot_h, width))
    x = LEFT
    for name, key, _ in series:
        parts.append(f'<rect class="bar s-{escape(key)}" x="{x}" y="6" width="11" height="11"/>'
                     f'<text class="legend" x="{x + 15}" y="16">{escape(name)}</text>')
        x += 14 + 7 * len(name) + 14
    parts.append("</svg>")
    return "".join(parts)


def horizontal_bars(*, title: str, items: Sequence[tuple[str, float]], money: bool = False,
                    width: int = NARROW) -> str:
    """One bar per item, longest scale at the largest value."""
    row_h = 28
    top = 6
    height = top + max(1, len(items)) * row_h + 6
    summary = "; ".join(f"{label}: {_number(value, money=money)}" for label, value in items) or "nothing yet"
    parts = [_open(title, summary, width, height)]
    if not items:
        parts.append(f'<text class="axis" x="0" y="{top + 16}">nothing recorded yet</text></svg>')
        return "".join(parts)
    label_w = 170
    top_value = max(value for _, value in items) or 1.0
    span = width - RIGHT - label_w - 80
    for i, (label, value) in enumerate(items):
        y = top + i * row_h
        w = max(0.0, span * value / top_value)
        parts.append(f'<text class="axis" x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(label[:28])}</text>'
                     f'<rect class="bar s-h{i % 4}" x="{label_w}" y="{y + 4}" width="{max(1.0, w):.1f}" height="18"/>'
                     f'<text class="value" x="{label_w + w + 6:.1f}" y="{y + 17}">'
                     f'{escape(_number(value, money=money))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line(*, title: str, labels: Sequence[str], values: Sequence[float | None], as_percent: bool = False,
         width: int = NARROW) -> str:
    """A line over time buckets; None leaves a gap (no data in that bucket)."""
    known = [v for v in values if v is not None]
    if known:
        first, last = known[0], known[-1]
        desc = (f"{len(known)} of {len(values)} buckets have data; first "
                f"{_number(first, percent=as_percent)}, last {_number(last, percent=as_percent)}.")
    else:
        desc = "No data in this window."
    head = _open(title, desc, width)
    plot_h = HEIGHT - TOP - BOTTOM
    top_value = 1.0 if as_percent else _nice_max(max(known, default=0))
    slot = (width - LEFT - RIGHT) / max(1, len(labels))
    parts = [head, *_y_axis(top_value, plot_h, width, percent=as_percent)]
    segment: list[str] = []
    segments: list[list[str]] = []
    for i, value in enumerate(values):
        if value is None:
            if segment:
                segments.append(segment)
            segment = []
            continue
        x = LEFT + slot * (i + 0.5)
        y = TOP + plot_h - plot_h * value / top_value
        segment.append(f"{x:.1f},{y:.1f}")
        parts.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3">'
                     f'<title>{escape(labels[i])}: {escape(_number(value, percent=as_percent))}</title></circle>')
    if segment:
        segments.append(segment)
    for points in segments:
        if len(points) > 1:
            parts.append(f'<polyline class="line" fill="none" points="{" ".join(points)}"/>')
    if not known:
        parts.append(f'<text class="axis" x="{LEFT + 10}" y="{TOP + plot_h / 2}">no answers in this window</text>')
    parts.extend(_x_labels(labels, slot, plot_h, width))
    parts.append("</svg>")
    return "".join(parts)
