"""Command-line prompt strings: ``--points "i,j,k,label;..."``, ``--box "i0,j0,k0,i1,j1,k1"``, ``--text``.

Coordinates are voxel indices of the input file's own array (as nibabel indexes it and as
ITK-SNAP shows them). Every malformed prompt raises ``InputError`` naming the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from medvlsam2.core.errors import InputError

MAX_TEXT_CHARS = 2000


def _ints(text: str, what: str, flag: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            number = float(part)
        except ValueError:
            raise InputError(f"{flag}: '{text}' is not {what} (found '{part}')") from None
        if number != number or number in (float("inf"), float("-inf")) or number != int(number):
            raise InputError(f"{flag}: '{text}': coordinates must be whole voxel indices, got '{part}'")
        values.append(int(number))
    return values


def parse_points(text: str) -> list[tuple[int, int, int, int]]:
    """``"i,j,k,label;..."`` -> ``[(i, j, k, label), ...]``; label 1 foreground, 0 background."""
    if not text or not text.strip():
        raise InputError("--points: empty; expected 'i,j,k,label;...'")
    points = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        values = _ints(chunk, "'i,j,k,label'", "--points")
        if len(values) != 4:
            raise InputError(f"--points: '{chunk}' has {len(values)} numbers; expected 'i,j,k,label'")
        i, j, k, label = values
        if label not in (0, 1):
            raise InputError(f"--points: '{chunk}': label must be 1 (foreground) or 0 (background), got {label}")
        if min(i, j, k) < 0:
            raise InputError(f"--points: '{chunk}': negative voxel index")
        points.append((i, j, k, label))
    if not points:
        raise InputError("--points: no point given; expected 'i,j,k,label;...'")
    return points


def parse_box(text: str) -> tuple[int, int, int, int, int, int]:
    """``"i0,j0,k0,i1,j1,k1"`` (inclusive corners) -> a 6-tuple."""
    if not text or not text.strip():
        raise InputError("--box: empty; expected 'i0,j0,k0,i1,j1,k1'")
    values = _ints(text, "'i0,j0,k0,i1,j1,k1'", "--box")
    if len(values) != 6:
        raise InputError(f"--box: '{text}' has {len(values)} numbers; expected 'i0,j0,k0,i1,j1,k1'")
    if min(values) < 0:
        raise InputError(f"--box: '{text}': negative voxel index")
    low, high = values[:3], values[3:]
    if any(a > b for a, b in zip(low, high)):
        raise InputError(f"--box: '{text}': minimum corner {tuple(low)} is above maximum corner {tuple(high)}")
    return tuple(values)  # type: ignore[return-value]


def check_inside(shape: Sequence[int], points: Sequence[Sequence[int]] = (), box: Sequence[int] | None = None) -> None:
    """Raise when a point or the box reaches outside a volume of ``shape`` (i, j, k)."""
    shape = tuple(int(s) for s in shape[:3])
    for n, point in enumerate(points, start=1):
        if any(c >= s for c, s in zip(point[:3], shape)):
            raise InputError(f"--points: point {n} {tuple(point[:3])} lies outside the volume of shape {shape}")
    if box is not None and any(c >= s for c, s in zip(box[3:], shape)):
        raise InputError(f"--box: {tuple(box)} reaches outside the volume of shape {shape}")


def check_text(text: str | None, *, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """Strip ``text``; an empty or over-long prompt is an error (None means no text prompt)."""
    if text is None:
        return None
    stripped = text.strip()
    if not stripped:
        raise InputError("--text: empty prompt")
    if len(stripped) > max_chars:
        raise InputError(f"--text: prompt is {len(stripped)} characters; the limit is {max_chars}")
    return stripped
