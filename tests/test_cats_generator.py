"""The CATS generator against the invariants of shared/spec/cats.md, on small instances."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bundleflow.errors import BundleflowError
from bundleflow.valuations import cats, cats_generate
from bundleflow.valuations.cats import CatsParams, ItemStructure


def _bidders(dist, n_items, params, values="upv", count=200, seed=0):
    """(structure, bidder) pairs, a fresh structure for each."""
    out = []
    for i in range(count):
        rng = cats_generate.sample_rng(seed, i)
        structure = cats.make_structure(dist, n_items, params, rng)
        out.append((structure, cats.sample_bidder(structure, params, values, rng)))
    return out


def _check_bidder(structure: ItemStructure, bidder: cats.Bidder, params: CatsParams) -> None:
    common, private = structure.common, bidder.private
    exponent = 1 + params.additivity

    def value(atom):  # v(S) = Σ (c + p) + |S|^(1+α): the size term is added
        return sum(common[i] + private[i] for i in atom) + len(atom) ** exponent

    atoms, values = bidder.atoms, bidder.values
    bundle, v_bundle = atoms[0], values[0]
    assert 1 <= len(atoms) <= 1 + params.max_substitutable_bids
    assert len({len(a) for a in atoms}) == 1, "every atom of a sample has the same size"
    assert all(len(set(a)) == len(a) for a in atoms)
    assert v_bundle > 0
    for atom, v in zip(atoms, values, strict=True):
        assert v == pytest.approx(value(atom), rel=1e-12, abs=1e-9)
    subs = list(zip(atoms[1:], values[1:], strict=True))
    assert len({frozenset(a) for a, _ in subs}) == len(subs), "substitutes pairwise distinct"
    resale_b = sum(common[i] for i in bundle)
    for atom, v in subs:
        assert set(atom) != set(bundle)
        assert 0 <= v <= params.budget_factor * v_bundle + 1e-9
        assert sum(common[i] for i in atom) >= params.resale_factor * resale_b - 1e-9
    sub_values = [v for _, v in subs]
    assert sub_values == sorted(sub_values, reverse=True), "substitutes most valuable first"
    assert bidder.candidates == len(bundle)
    assert len(atoms) - 1 <= bidder.candidates - bidder.dropped


def _check_growth(structure: ItemStructure, bidder: cats.Bidder) -> None:
    """Regions: each added good is a grid neighbour of a good already in the bundle, unless
    it came by a jump. Arbitrary: never a jump."""
    for atom, how in zip(bidder.atoms, bidder.how, strict=True):
        assert len(how) == len(atom) and how[0] == "first"
        for t in range(1, len(atom)):
            if structure.dist == "arbitrary":
                assert how[t] == "edge"
            elif how[t] == "edge":
                assert any(atom[t] in structure.neighbors[j] for j in atom[:t])
            else:
                assert how[t] == "jump"


@pytest.mark.parametrize("dist", cats.DISTRIBUTIONS)
@pytest.mark.parametrize("values", cats.PRIVATE_VALUES)
def test_bidder_invariants(dist, values):
    params = CatsParams()
    for structure, bidder in _bidders(dist, 16, params, values, count=150):
        _check_bidder(structure, bidder, params)
        _check_growth(structure, bidder)


def test_regions_jumps_happen_and_edges_follow_the_grid():
    params = CatsParams(jump_prob=0.3)
    pairs = _bidders("regions", 25, params, count=100)
    steps = [h for _, b in pairs for how in b.how for h in how[1:]]
    assert "jump" in steps and "edge" in steps
    for structure, bidder in pairs:
        _check_growth(structure, bidder)


@settings(max_examples=40, deadline=None)
@given(
    dist=st.sampled_from(cats.DISTRIBUTIONS),
    values=st.sampled_from(cats.PRIVATE_VALUES),
    n_items=st.integers(4, 30),
    max_subs=st.integers(0, 7),
    additional_location=st.floats(0.0, 0.97),
    budget=st.floats(0.5, 3.0),
    resale=st.floats(0.0, 1.0),
    remove=st.floats(0.0, 0.6),
    jump=st.floats(0.0, 1.0),
    additivity=st.floats(-0.2, 1.0),
    seed=st.integers(0, 2**40),
)
def test_bidder_invariants_any_parameters(
    dist, values, n_items, max_subs, additional_location, budget, resale, remove, jump,
    additivity, seed,
):  # fmt: skip
    params = CatsParams(
        max_substitutable_bids=max_subs,
        additional_location=additional_location,
        budget_factor=budget,
        resale_factor=resale,
        remove_neighbor=remove,
        jump_prob=jump,
        additivity=additivity,
    )
    rng = random.Random(seed)
    structure = cats.make_structure(dist, n_items, params, rng)
    for _ in range(3):
        bidder = cats.sample_bidder(structure, params, values, rng)
        _check_bidder(structure, bidder, params)
        _check_growth(structure, bidder)


def test_regions_map_is_a_grid_with_diagonals():
    params = CatsParams()
    for seed in range(30):
        s = cats.regions_structure(50, params, random.Random(seed))
        side = s.grid_side
        assert side == 7
        for a, nbrs in enumerate(s.neighbors):
            if a >= side * side:
                assert nbrs == (), "goods beyond r² have no neighbours"
                continue
            assert nbrs, "every grid cell has a neighbour"
            for b in nbrs:
                assert a in s.neighbors[b], "edges are symmetric"
                (i, j), (x, y) = divmod(a, side), divmod(b, side)
                assert max(abs(i - x), abs(j - y)) == 1, "grid or diagonal neighbours only"


def test_regions_full_grid_without_removal_or_diagonals():
    params = CatsParams(remove_neighbor=0.0, additional_neighbor=0.0)
    s = cats.regions_structure(9, params, random.Random(0))
    expected = {0: (1, 3), 1: (0, 2, 4), 4: (1, 3, 5, 7), 8: (5, 7)}
    for good, nbrs in expected.items():
        assert s.neighbors[good] == nbrs


def test_arbitrary_weights_symmetric_positive():
    s = cats.arbitrary_structure(12, CatsParams(), random.Random(3))
    d = s.proximity
    for i in range(12):
        assert d[i][i] == 0
        for j in range(12):
            if i != j:
                assert 0 < d[i][j] < 1 and d[i][j] == d[j][i]
    assert all(1 <= c <= 100 for c in s.common)


def test_npv_weights_are_shifted_by_the_minimum():
    _, w = cats.draw_private_values(20, CatsParams(), "npv", random.Random(1))
    assert min(w) == 0 and math.isclose(sum(w), 1)
    p, w = cats.draw_private_values(20, CatsParams(), "upv", random.Random(1))
    assert all(-50 <= x <= 50 for x in p)
    assert [round(x, 12) for x in w] == [round((x + 50) / sum(y + 50 for y in p), 12) for x in p]


def test_candidate_that_cannot_grow_is_dropped():
    # good 0 is isolated; goods 1-2-3 form a path
    structure = ItemStructure("regions", common=(50.0,) * 4, neighbors=((), (2,), (1, 3), (2,)))
    weights = [0.25] * 4
    rng = random.Random(0)
    assert cats.grow_candidate(structure, weights, 0, 2, jump_prob=0.0, rng=rng) is None
    grown = cats.grow_candidate(structure, weights, 1, 3, jump_prob=0.0, rng=rng)
    assert grown is not None and sorted(grown[0]) == [1, 2, 3]
    # a bidder whose bundle reached the isolated good by a jump: its candidate from that good
    # is dropped (not looped on), and the bidder is still valid
    params = CatsParams(jump_prob=0.5, additional_location=0.8)
    dropped = 0
    for seed in range(300):
        bidder = cats.sample_bidder(structure, params, "upv", random.Random(seed))
        _check_bidder(structure, bidder, params)
        dropped += bidder.dropped
    assert dropped > 0


def test_restart_when_value_not_positive():
    # private values far below zero: most first bundles have v ≤ 0 and are redrawn
    params = CatsParams(normal_mean=-60.0, normal_stdev=5.0)
    structure = cats.arbitrary_structure(6, params, random.Random(0))
    restarts = 0
    for seed in range(50):
        bidder = cats.sample_bidder(structure, params, "npv", random.Random(seed))
        assert bidder.values[0] > 0
        restarts += bidder.restarts
    assert restarts > 0


def test_generate_shape_padding_and_determinism():
    params = CatsParams(max_substitutable_bids=3)
    a = cats_generate.generate("regions", 16, 40, seed=7, params=params)
    b = cats_generate.generate("regions", 16, 40, seed=7, params=params)
    c = cats_generate.generate("regions", 16, 40, seed=8, params=params)
    assert a.shape == (40, 4, 17) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    items, values = a[..., :-1], a[..., -1]
    assert set(items.unique().tolist()) <= {0.0, 1.0}
    is_atom = items.sum(-1) > 0
    assert bool(is_atom[:, 0].all())
    assert bool((values[~is_atom] == 0).all()), "padding rows are all zero"
    assert bool((values[is_atom] >= 0).all()) and bool((values[:, 0] > 0).all())
    # atoms fill the first rows, no gaps
    assert bool((is_atom[:, 1:] <= is_atom[:, :-1]).all())


def test_output_independent_of_worker_count():
    n = 2 * cats_generate.CHUNK_SIZE + 17
    one = cats_generate.generate("arbitrary", 10, n, seed=3, workers=1)
    two = cats_generate.generate("arbitrary", 10, n, seed=3, workers=2)
    assert torch.equal(one, two)
    head = cats_generate.generate("arbitrary", 10, 17, seed=3, workers=1)
    assert torch.equal(one[:17], head), "sample i depends on (seed, i) only"


def test_fixed_mode_shares_the_structure():
    fixed = cats_generate.generate("regions", 16, 30, seed=5, mode="fixed")
    fresh = cats_generate.generate("regions", 16, 30, seed=5, mode="fresh")
    assert torch.equal(fixed, cats_generate.generate("regions", 16, 30, seed=5, mode="fixed"))
    assert not torch.equal(fixed, fresh)


def test_default_statistics_at_m50():
    """Orders of magnitude from the spec: atom size 1 + geometric (mean ≈ 10, median ≈ 7),
    most bidders with 6 atoms, max values in the hundreds. Bounds are ~5 standard errors."""
    from bundleflow.valuations.stats import dataset_stats

    for dist in cats.DISTRIBUTIONS:
        s = dataset_stats(cats_generate.generate(dist, 50, 1000, seed=11, workers=1))
        assert 8.5 < s["mean_atom_size"] < 11.5
        assert 6 <= s["median_atom_size"] <= 8
        assert 4.3 < s["mean_atoms"] < 5.1
        assert 0.52 < s["share_six_atoms"] < 0.68
        assert 600 < s["mean_max_value"] < 850


@pytest.mark.parametrize(
    "kwargs",
    [
        {"additional_location": 1.0},
        {"jump_prob": 1.5},
        {"max_substitutable_bids": -1},
        {"deviation": float("nan")},
        {"max_good_value": 0.5},
    ],
)
def test_bad_parameters_are_user_errors(kwargs):
    with pytest.raises(BundleflowError, match=next(iter(kwargs))):
        CatsParams(**kwargs)


def test_bad_generate_arguments():
    with pytest.raises(BundleflowError, match="at least 4 goods"):
        cats_generate.generate("regions", 3, 5, seed=0)
    with pytest.raises(BundleflowError, match="dist"):
        cats_generate.generate("paths", 10, 5, seed=0)
    with pytest.raises(BundleflowError, match="--n"):
        cats_generate.generate("arbitrary", 10, 0, seed=0)
    with pytest.raises(BundleflowError, match="unknown CATS parameter"):
        CatsParams.from_dict({"jump": 0.1})
