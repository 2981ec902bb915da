"""Adam for the Stage-2 step on CUDA: one compiled elementwise kernel per parameter.

torch's fused Adam walks the parameters with ``multi_tensor_apply``: one thread block per
65,536-element chunk, so the 2·10⁶ support locations of paper size (J=5,000 × D=8 × m=50)
get 31 blocks on a 132-SM H200 and the update took 0.107 ms of a 0.61 ms step (profile in
BENCHMARKS.md, issue 16). The same update written as one elementwise function and compiled
by inductor runs over the whole GPU. The math is torch's Adam (no weight decay, no AMSGrad):

    m ← m + (1−β1)(g − m),  v ← β2 v + (1−β2) g²,  t ← t + 1
    θ ← θ − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)

and the state is Adam's (``step`` a 0-d float32 tensor on the parameter's device,
``exp_avg``, ``exp_avg_sq``), so checkpoints load either way. Everything stays on the
device: the step is capturable in a CUDA graph. Where compilation fails (no C compiler in
the image, an old Triton), the same function runs eagerly — a few more kernels, the same
numbers up to rounding — and ``eager_reason`` says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from loguru import logger
from torch import Tensor


def adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One Adam update of ``param`` in place (every tensor on one device; ``step`` 0-d)."""
    step.add_(1)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = step.double()  # bias corrections in float64, as torch's Adam computes them
    step_size = (lr / (1 - torch.pow(beta1, t))).to(param.dtype)
    bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt().to(param.dtype)
    denom = exp_avg_sq.sqrt() / bias2_sqrt + eps
    param.sub_(exp_avg / denom * step_size)


_COMPILED: Callable | None = None


def _compiled_update() -> Callable:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(adam_update, fullgraph=True)
    return _COMPILED


class CompiledAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose step is :func:`adam_update`, compiled (CUDA) or eager.

    Accepts Adam's arguments except weight decay, AMSGrad, maximize and differentiable.
    ``compile=False`` runs the function eagerly (the CPU tests compare it with Adam).
    """

    def __init__(self, params, *, compile: bool = True, **kwargs) -> None:
        for key in ("weight_decay", "amsgrad", "maximize", "differentiable"):
            if kwargs.get(key):
                raise ValueError(f"CompiledAdam does not support {key}")
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        super().__init__(params, foreach=False, **kwargs)
        self._update: Callable = _compiled_update() if compile else adam_update
        self.eager_reason: str | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        if closure is not None:
            raise ValueError("CompiledAdam takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                elif state["step"].device != param.device:  # a checkpoint of a CPU-step Adam
                    state["step"] = state["step"].to(param.device, torch.float32)
                args = (param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                self._apply(*args, float(group["lr"]), beta1, beta2, group["eps"])
        return None

    def _apply(self, *args) -> None:
        try:
            self._update(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run the math eagerly
            if self._update is adam_update:
                raise
            self.eager_reason = f"compiled Adam failed ({type(err).__name__}: {err})"[:300]
            logger.warning("{}; Adam runs eagerly", self.eager_reason)
            self._update = adam_update
            # the failure happened before any in-place write (compilation precedes the run)
            adam_update(*args)
