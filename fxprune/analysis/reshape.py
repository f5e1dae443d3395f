"""The algebra of a reshape, on plain shapes: which input axes become which output axes (``reshape_chunks``),
the common refinement of two factorisations of one flat range (``atoms``), and which factor of a merged or
split axis carries the channel identity (``carrier_axis``). The reshape rules (``rules/shape.py``) link
channels by these; ``tests/test_reshape_algebra.py`` checks them as properties."""
from __future__ import annotations

__all__ = ["reshape_chunks", "atoms", "carrier_axis"]


def reshape_chunks(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes with equal numel into aligned chunks ([in axes], [out axes]) of equal product."""
    chunks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            chunks.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            chunks.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise ValueError("shapes do not match")
        ia, jb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    raise ValueError("shapes do not match")
                ia.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(b):
                    raise ValueError("shapes do not match")
                jb.append(j)
                pb *= b[j]
                j += 1
        chunks.append((ia, jb))
    return chunks


def atoms(a: list[int], b: list[int]) -> list[int] | None:
    """The common refinement of two factorisations of one flat range: the strides (from the inner
    end) at which either shape has an axis boundary, if they nest (each divides the next)."""
    def cuts(sizes: list[int]) -> set[int]:
        out, p = set(), 1
        for n in reversed(sizes):
            p *= n
            out.add(p)
        return out
    points = sorted(cuts(a) | cuts(b))
    if any(q % p for p, q in zip(points, points[1:])):
        return None
    return points


def carrier_axis(sizes: list[int], axes: list[int], avoid: set[int], prefer: int | None = None) -> int | None:
    """Which factor axis carries the channel identity of a merged/split axis: ``prefer`` if given and
    usable, else the outermost real one."""
    real = [x for x in axes if sizes[x] > 1]
    preferred = [x for x in real if x not in avoid]
    if prefer in preferred:
        return prefer
    pick = preferred or real
    return pick[0] if pick else None
