"""The dashboard's server-drawn SVG charts (smallfirst.api.dashboard.charts)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from smallfirst.api.dashboard import charts

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    # Inline SVG in HTML has no namespace declaration; add it to parse the markup as XML.
    return ET.fromstring(svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))


def test_stacked_bars_say_their_totals_in_words_and_draw_one_bar_per_nonzero_value() -> None:
    # when
    svg = charts.stacked_bars(title="Jobs", labels=["10:00", "10:01"],
                              series=[("small", "small", [2, 0]), ("frontier", "frontier", [1, 1])])

    # then
    root = parse(svg)
    assert root.find(f"{SVG}desc").text == "Over 2 time buckets. Totals: small: 2, frontier: 2."  # type: ignore[union-attr]
    bars = [rect for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None]
    assert len(bars) == 3


def test_chart_text_is_escaped() -> None:
    # when: a label that is markup
    svg = charts.horizontal_bars(title="Reasons <b>", items=[("<script>alert(1)</script>", 2.0)])

    # then
    assert "<script>" not in svg
    assert parse(svg).find(f"{SVG}title").text == "Reasons <b>"  # type: ignore[union-attr]


def test_a_line_leaves_gaps_where_a_bucket_has_no_data() -> None:
    # when: data, a gap, data, data
    svg = charts.line(title="Share", labels=["a", "b", "c", "d"], values=[0.5, None, 0.25, 0.0], as_percent=True)

    # then: three points, one polyline (the single point before the gap has none)
    root = parse(svg)
    assert len(list(root.iter(f"{SVG}circle"))) == 3
    assert len(list(root.iter(f"{SVG}polyline"))) == 1


def test_count_axes_have_whole_numbered_steps() -> None:
    assert [charts._count_scale(v) for v in (0, 3, 5, 11, 230)] == [4, 4, 8, 20, 400]
