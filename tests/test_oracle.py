"""The batched value oracle against a brute-force loop over atoms."""

from __future__ import annotations

import pytest
import torch

from bundleflow.valuations.additive import additive_bundle_values
from bundleflow.valuations.oracle import bundle_values
from bundleflow.valuations.xor import xor_bundle_values, xor_value_bruteforce


def random_xor(n: int, k: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """Random XOR valuations with a random number of real atoms and zero-row padding."""
    out = torch.zeros(n, k, m + 1)
    for i in range(n):
        n_real = int(torch.randint(1, k + 1, (1,), generator=gen))
        atoms = (torch.rand(n_real, m, generator=gen) < 0.35).float()
        atoms[torch.arange(n_real), torch.randint(m, (n_real,), generator=gen)] = 1  # non-empty
        out[i, :n_real, :m] = atoms
        out[i, :n_real, m] = torch.rand(n_real, generator=gen) * 100
    return out


@pytest.mark.parametrize("seed", range(5))
def test_oracle_matches_bruteforce(seed):
    gen = torch.Generator().manual_seed(seed)
    m = 6
    vals = random_xor(9, 4, m, gen)
    bundles = (torch.rand(40, m, generator=gen) < 0.5).float()
    bundles[0] = 0  # the empty bundle is worth 0 to everyone
    bundles[1] = 1  # the grand bundle is worth the largest atom
    got = xor_bundle_values(vals, bundles)
    want = torch.tensor(
        [[xor_value_bruteforce(v, s) for s in bundles] for v in vals], dtype=torch.float32
    )
    assert torch.equal(got, want)
    assert torch.all(got[:, 0] == 0)
    assert torch.equal(got[:, 1], vals[..., -1].amax(dim=1))


def test_chunking_and_low_precision_do_not_change_values():
    gen = torch.Generator().manual_seed(7)
    m = 40
    vals = random_xor(16, 6, m, gen)
    bundles = (torch.rand(300, m, generator=gen) < 0.7).float()
    full = xor_bundle_values(vals, bundles)
    tiny_chunks = xor_bundle_values(vals, bundles, chunk_elements=16 * 6 * 7)  # 7 bundles/chunk
    bf16 = xor_bundle_values(vals, bundles, inclusion_dtype=torch.bfloat16)
    fp16 = xor_bundle_values(vals, bundles, inclusion_dtype=torch.float16)
    assert torch.equal(full, tiny_chunks)
    assert torch.equal(full, bf16)
    assert torch.equal(full, fp16)
    assert (full > 0).any() and (full == 0).any()  # both cases exercised


def test_bf16_mask_exact_when_counts_exceed_256():
    # An atom of 400 items against the empty bundle: the count 400 is not representable in
    # bf16 (it rounds), but it must never round to 0.
    m = 400
    vals = torch.zeros(1, 2, m + 1)
    vals[0, 0, :m] = 1
    vals[0, 0, m] = 5.0
    bundles = torch.stack([torch.zeros(m), torch.ones(m)])
    got = xor_bundle_values(vals, bundles, inclusion_dtype=torch.bfloat16)
    assert got.tolist() == [[0.0, 5.0]]


def test_additive_values_and_dispatch():
    v = torch.tensor([[0.2, 0.7], [1.0, 0.0]])
    bundles = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    want = torch.tensor([[0.0, 0.2, 0.7, 0.9], [0.0, 1.0, 0.0, 1.0]])
    assert torch.allclose(additive_bundle_values(v, bundles), want)
    assert torch.allclose(bundle_values(v, bundles), want)


def test_shape_errors():
    with pytest.raises(ValueError, match="bundles must be"):
        xor_bundle_values(torch.zeros(2, 3, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="valuations must be"):
        bundle_values(torch.zeros(2), torch.zeros(4, 5))
