"""The reshape algebra (fxprune.analysis.reshape) as properties over random shapes: the chunks of a reshape
cover both shapes in order with equal products and are minimal; the atoms of two factorisations are the
common refinement exactly when the cuts nest; the carrier is the outermost usable factor."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.analysis.reshape import atoms, carrier_axis, reshape_chunks

FACTORS = st.lists(st.sampled_from([1, 2, 3, 4, 5, 6, 8]), min_size=1, max_size=6)


@st.composite
def two_shapes(draw):
    """Two shapes of one numel: the same list of factors grouped into axes two ways (ones sprinkled in)."""
    factors = draw(FACTORS)

    def grouped() -> list[int]:
        cuts = sorted(draw(st.sets(st.integers(1, len(factors) - 1), max_size=len(factors) - 1))) \
            if len(factors) > 1 else []
        bounds = [0, *cuts, len(factors)]
        shape = [math.prod(factors[i:j]) for i, j in zip(bounds, bounds[1:])]
        for _ in range(draw(st.integers(0, 2))):
            shape.insert(draw(st.integers(0, len(shape))), 1)
        return shape

    return grouped(), grouped()


def _cuts(shape: list[int]) -> set[int]:
    return {math.prod(shape[i:]) for i in range(len(shape))}


@settings(max_examples=300, deadline=None)
@given(two_shapes())
def test_chunks_cover_both_shapes_in_order_with_equal_products(shapes):
    a, b = shapes
    chunks = reshape_chunks(a, b)
    assert [i for ia, _ in chunks for i in ia] == list(range(len(a)))
    assert [j for _, jb in chunks for j in jb] == list(range(len(b)))
    for ia, jb in chunks:
        assert ia or jb
        assert math.prod(a[i] for i in ia) == math.prod(b[j] for j in jb), (a, b, chunks)


@settings(max_examples=300, deadline=None)
@given(two_shapes())
def test_chunks_are_minimal(shapes):
    """No chunk of real axes could be cut into two chunks of equal products: the links are as fine as the
    shapes allow (a coarser chunk would freeze or mix axes that map one to one)."""
    a, b = shapes
    for ia, jb in reshape_chunks(a, b):
        for k in range(1, len(ia) + 1):
            for m in range(1, len(jb) + 1):
                if (k, m) == (len(ia), len(jb)):
                    continue
                if all(a[i] == 1 for i in ia[k:]) and all(b[j] == 1 for j in jb[m:]):
                    continue  # trailing ones: the same cut
                assert math.prod(a[i] for i in ia[:k]) != math.prod(b[j] for j in jb[:m]), (a, b, ia, jb, k, m)


@given(FACTORS, FACTORS)
def test_chunks_refuse_shapes_of_different_numel(a, b):
    if math.prod(a) != math.prod(b):
        with pytest.raises(ValueError):
            reshape_chunks(a, b)


@settings(max_examples=300, deadline=None)
@given(two_shapes())
def test_atoms_are_the_common_refinement_when_the_cuts_nest(shapes):
    a, b = [[n for n in s if n > 1] or [1] for s in shapes]
    points = sorted(_cuts(a) | _cuts(b))
    nests = all(q % p == 0 for p, q in zip(points, points[1:]))
    found = atoms(a, b)
    if not nests:
        assert found is None
        return
    assert found == points and found[-1] == math.prod(a) == math.prod(b)
    assert _cuts(a) <= set(found) and _cuts(b) <= set(found)


def test_atoms_of_heads_folded_into_the_batch():
    """(batch, heads * dim) -> (batch * heads, dim): strides dim, heads * dim, batch * heads * dim."""
    assert atoms([2, 4 * 8], [2 * 4, 8]) == [8, 32, 64]
    assert atoms([6], [4, 9]) is None or atoms([6, 6], [4, 9]) is None


@pytest.mark.parametrize("sizes, axes, avoid, prefer, want", [
    ([4, 8], [0, 1], set(), None, 0),       # outermost real factor
    ([1, 8], [0, 1], set(), None, 1),       # a size-1 factor carries nothing
    ([4, 8], [0, 1], {0}, None, 1),         # the batch never carries a channel
    ([4, 8], [0, 1], {0, 1}, None, 0),      # all avoided: the outermost real one still
    ([4, 8], [0, 1], set(), 1, 1),          # the axis a later op merges back
    ([4, 8], [0, 1], {1}, 1, 0),            # ... unless avoided
    ([1, 1], [0, 1], set(), None, None),    # nothing real: no carrier
])
def test_carrier_axis(sizes, axes, avoid, prefer, want):
    assert carrier_axis(sizes, axes, avoid, prefer) == want
