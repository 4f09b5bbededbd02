"""Prompt-string parsing: exact values, clear errors, and no crash on any input (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medvlsam2.core.errors import InputError
from medvlsam2.core.prompts import check_inside, check_text, parse_box, parse_points


def test_points_and_box_parse():
    assert parse_points("10,20,30,1; 5,6,7,0") == [(10, 20, 30, 1), (5, 6, 7, 0)]
    assert parse_points("1,2,3,1;") == [(1, 2, 3, 1)]
    assert parse_box("1,2,3,4,5,6") == (1, 2, 3, 4, 5, 6)
    assert parse_box("4, 4, 4, 4, 4, 4") == (4, 4, 4, 4, 4, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2,3", "has 3 numbers; expected 'i,j,k,label'"),
        ("1,2,3,2", "label must be 1 (foreground) or 0 (background), got 2"),
        ("1,2,3,-1", "label must be 1 (foreground) or 0 (background), got -1"),
        ("1,-2,3,1", "negative voxel index"),
        ("a,b,c,1", "found 'a'"),
        ("1.5,2,3,1", "whole voxel indices"),
        ("", "empty"),
        (";;", "no point given"),
    ],
)
def test_bad_points_are_named(text, message):
    with pytest.raises(InputError, match="--points") as err:
        parse_points(text)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5,5,5,1,1,1", "minimum corner (5, 5, 5) is above maximum corner (1, 1, 1)"),
        ("1,2,3", "has 3 numbers"),
        ("0,0,0,1,1,nan", "whole voxel indices"),
        ("0,0,-1,1,1,1", "negative voxel index"),
    ],
)
def test_bad_boxes_are_named(text, message):
    with pytest.raises(InputError, match="--box") as err:
        parse_box(text)
    assert message in str(err.value)


def test_outside_volume_is_named():
    with pytest.raises(InputError, match=r"point 2 \(9, 0, 0\) lies outside the volume of shape \(8, 8, 8\)"):
        check_inside((8, 8, 8), points=[(1, 1, 1, 1), (9, 0, 0, 1)])
    with pytest.raises(InputError, match="--box: .* reaches outside"):
        check_inside((8, 8, 8), box=(0, 0, 0, 8, 3, 3))
    check_inside((8, 8, 8), points=[(7, 7, 7, 0)], box=(0, 0, 0, 7, 7, 7))


def test_text_prompt_limits():
    assert check_text("  segment the liver ") == "segment the liver"
    assert check_text(None) is None
    with pytest.raises(InputError, match="--text: empty prompt"):
        check_text("   ")
    with pytest.raises(InputError, match="--text: prompt is 2001 characters; the limit is 2000"):
        check_text("x" * 2001)


@given(st.text(alphabet="0123456789,;-. abcnaie+", max_size=60))
def test_point_parser_never_crashes(text):
    try:
        points = parse_points(text)
    except InputError:
        return
    assert all(len(p) == 4 and p[3] in (0, 1) and min(p[:3]) >= 0 for p in points)


@given(st.text(max_size=60))
def test_box_parser_never_crashes(text):
    try:
        box = parse_box(text)
    except InputError:
        return
    assert len(box) == 6 and all(a <= b for a, b in zip(box[:3], box[3:]))
