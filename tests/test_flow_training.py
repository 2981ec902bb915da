"""Stage 1 on a tiny problem: the loss falls and the flow rounds like 1[z ≥ 0.5]."""

from __future__ import annotations

import pytest
import torch

from bundleflow.maths.flow import (
    MixtureNoise,
    VelocityField,
    flow_pairs,
    integrate,
    rectified_flow_loss,
    round_bundles,
)
from bundleflow.train.config import FlowConfig, Stage1Config
from bundleflow.train.stage1_step import Stage1Step


def test_mixture_means_are_saved_with_the_flow_state():
    noise = MixtureNoise(5, generator=torch.Generator().manual_seed(0))
    assert noise.means.shape == (3, 5)
    assert bool(((noise.means > 0.45 + 0.05) & (noise.means < 0.45 + 0.1 * 0.7311)).all())
    other = MixtureNoise(5, generator=torch.Generator().manual_seed(1))
    other.load_state_dict(noise.state_dict())
    assert torch.equal(other.means, noise.means)


def test_pairs_target_the_rounded_corner():
    noise = MixtureNoise(6, generator=torch.Generator().manual_seed(0))
    z0, z1 = flow_pairs(noise, 20000, generator=torch.Generator().manual_seed(1))
    corner = (z0 >= 0.5).float()
    assert abs(float((z1 - corner).std()) - 0.1) < 0.005
    assert abs(float((z0 - noise.means.mean(0)).std()) - 0.05) < 0.03  # e^-3 ≈ 0.0498 + spread


def test_loss_formula_with_a_constant_field():
    """Q ≡ 0.3, σ ≡ 1 makes v = 0.3·z_t; the loss is mean ||(z1 − z0) − 0.3 z_t||²."""
    field = VelocityField(2, hidden=4)
    with torch.no_grad():
        for layer in (field.fc1, field.fc2, field.fct1):
            layer.weight.zero_()
            layer.bias.zero_()
        field.fc3.weight.zero_()
        field.fc3.bias.fill_(0.3)
        field.fct2.weight.zero_()
        field.fct2.bias.fill_(1.0)
    z0 = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    z1 = torch.tensor([[2.0, 2.0], [0.5, 1.0]])
    t = torch.tensor([[0.5], [0.0]])
    # row 1: z_t = (1.5, 2), residual (1, 0) − (0.45, 0.6) → 0.55² + 0.6² = 0.6625
    # row 2: z_t = (0.5, 0), residual (0, 1) − (0.15, 0)  → 0.15² + 1   = 1.0225
    assert torch.isclose(rectified_flow_loss(field, z0, z1, t), torch.tensor(0.8425))


def test_training_lowers_loss_and_learns_rounding():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    field = VelocityField(4, hidden=64)
    noise = MixtureNoise(4, generator=gen)
    cfg = Stage1Config(steps=1500, batch_size=256, lr=5e-3, lr_schedule="constant")
    step = Stage1Step(field, noise, cfg, FlowConfig(target_std=0.1), "cpu", generator=gen)
    for _ in range(cfg.steps):  # the trainer's own Stage-1 step
        step()
    losses = step.losses.tolist()
    assert len(losses) == 1500
    first, last = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    assert last < 0.6 * first
    held_out = noise.sample(4000, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        bundles = round_bundles(integrate(field, held_out, 5).z_n)
    agreement = float((bundles == (held_out >= 0.5).float()).float().mean())
    assert agreement > 0.95


def test_flow_and_mixture_checkpoint_round_trip(tmp_path):
    from bundleflow.errors import BundleflowError
    from bundleflow.maths.flow import flow_from_state, flow_state
    from bundleflow.train.checkpoint import read_checkpoint, write_checkpoint

    field = VelocityField(150)  # wide: h=256, h'=512 must survive the round trip
    noise = MixtureNoise(150, generator=torch.Generator().manual_seed(4))
    tensors, header = flow_state(field, noise)
    write_checkpoint(tmp_path / "flow", {"flow": tensors}, step=3, extra={"flow": header})
    components, manifest = read_checkpoint(tmp_path / "flow")
    back, back_noise = flow_from_state(components["flow"], manifest["extra"]["flow"])
    assert manifest["step"] == 3
    assert torch.equal(back_noise.means, noise.means)
    z0 = torch.rand(7, 150)
    assert torch.equal(back.q(z0), field.q(z0))
    assert (back.fc2.in_features, back.fc2.out_features) == (256, 512)
    with pytest.raises(BundleflowError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "nope")
