"""CompiledAdam (bundleflow.maths.adam): torch's Adam, one elementwise function per parameter."""

from __future__ import annotations

import pytest
import torch

from bundleflow.maths.adam import CompiledAdam, adam_update


def _pair(device="cpu", compile=False, **opt_kw):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, 5, generator=gen).to(device).requires_grad_()
    b = torch.randn(7, generator=gen).to(device).requires_grad_()
    a2, b2 = (x.detach().clone().requires_grad_() for x in (a, b))
    ref = torch.optim.Adam([{"params": [a], "lr": 0.3}, {"params": [b], "lr": 0.01}], **opt_kw)
    ours = CompiledAdam(
        [{"params": [a2], "lr": 0.3}, {"params": [b2], "lr": 0.01}], compile=compile, **opt_kw
    )
    return (ref, a, b), (ours, a2, b2), gen


def _run(pairs, gen, steps, device="cpu"):
    for _ in range(steps):
        ga = torch.randn(300, 8, 5, generator=gen).to(device)
        gb = torch.randn(7, generator=gen).to(device)
        for opt, a, b in pairs:
            opt.zero_grad()
            a.grad, b.grad = ga.clone(), gb.clone()
            opt.step()


def test_matches_torch_adam_over_many_steps():
    ref, ours, gen = _pair()
    _run([ref, ours], gen, 60)
    for x, y in zip(ref[1:], ours[1:], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5 * float(x.detach().abs().max()))
    # the state is Adam's: same keys and values
    for x, y in zip(ref[1:], ours[1:], strict=True):
        sx, sy = ref[0].state[x], ours[0].state[y]
        assert set(sx) == set(sy) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(sy["step"]) == float(sx["step"]) == 60
        torch.testing.assert_close(sy["exp_avg_sq"], sx["exp_avg_sq"], rtol=1e-5, atol=1e-7)


def test_one_step_by_hand():
    """After one step Adam moves every entry by lr·sign(g) (m̂ = g, v̂ = g²), up to ε."""
    p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    opt = CompiledAdam([p], lr=0.1, compile=False)
    p.grad = torch.tensor([3.0, -0.5, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 0.5]), rtol=0, atol=1e-6)


def test_state_dict_round_trips_both_ways():
    """A checkpoint of torch's Adam resumes in CompiledAdam and the other way round."""
    ref, ours, gen = _pair()
    _run([ref, ours], gen, 10)
    swapped = CompiledAdam(
        [{"params": [ref[1]], "lr": 0.3}, {"params": [ref[2]], "lr": 0.01}], compile=False
    )
    swapped.load_state_dict(ref[0].state_dict())
    back = torch.optim.Adam([{"params": [ours[1]], "lr": 0.3}, {"params": [ours[2]], "lr": 0.01}])
    back.load_state_dict(ours[0].state_dict())
    _run([(swapped, *ref[1:]), (back, *ours[1:])], gen, 10)
    for x, y in zip(ref[1:], ours[1:], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5 * float(x.detach().abs().max()))


@pytest.mark.parametrize("key", ["weight_decay", "amsgrad", "maximize"])
def test_refuses_what_it_does_not_implement(key):
    with pytest.raises(ValueError, match=key):
        CompiledAdam(
            [torch.zeros(2, requires_grad=True)], **{key: 0.1 if key == "weight_decay" else True}
        )


def test_eager_math_is_the_compiled_function():
    ours = CompiledAdam([torch.zeros(2, requires_grad=True)], compile=False)
    assert ours._update is adam_update


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_on_cuda_matches_fused_adam_and_captures_in_a_graph():
    ref, ours, gen = _pair("cuda", compile=True, capturable=True)
    fused = torch.optim.Adam(
        [{"params": [ref[1]], "lr": 0.3}, {"params": [ref[2]], "lr": 0.01}],
        fused=True, capturable=True,
    )  # fmt: skip
    ref = (fused, *ref[1:])
    _run([ref, ours], gen, 20, "cuda")
    assert ours[0].eager_reason is None, ours[0].eager_reason
    # captured: the replayed update continues the same trajectory
    ga = torch.zeros(300, 8, 5, device="cuda")
    gb = torch.zeros(7, device="cuda")
    ours[1].grad, ours[2].grad = ga, gb
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ours[0].step()  # warm-up of the compiled code outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        ours[0].step()
    ref[1].grad, ref[2].grad = torch.zeros_like(ga), torch.zeros_like(gb)
    ref[0].step()  # the warm-up step (zero gradient) on the reference too
    for _ in range(10):
        new_a = torch.randn(300, 8, 5, generator=gen).cuda()
        new_b = torch.randn(7, generator=gen).cuda()
        ga.copy_(new_a)
        gb.copy_(new_b)
        graph.replay()
        ref[1].grad, ref[2].grad = new_a.clone(), new_b.clone()
        ref[0].step()
    for x, y in zip(ref[1:], ours[1:], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5 * float(x.detach().abs().max()))
