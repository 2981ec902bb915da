"""Stage 1: the velocity network, its training data and loss, and the one integrator.

The velocity field has the reference's diagonal form

    v(z0, z_t, t) = Q(z0) ⊙ z_t · σ(t)

with Q: R^m → R^m (m → h → h' → m, tanh) and σ: R → R (1 → h → 1, tanh). Because Q
depends on z0 only, dz/dt = σ(t) Q(z0) ⊙ z is linear in z, so N Euler steps are

    z_N = z0 ⊙ Π_{i<N} (1 + Q(z0) σ(i/N) / N)

and the log-density change is −ΣQ(z0) · ∫σ, with ∫σ = (1/N) Σ_{i<N} σ(i/N) on the same
grid. :func:`integrate` computes this with one evaluation of Q per point (``path="fast"``)
or with N full network calls exactly as the public code does (``path="reference"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from bundleflow.errors import BundleflowError

IntegratorPath = Literal["fast", "reference"]

# The reference's flow widths: h = 128, and h = 256 with h' = 2h above 100 items.
WIDE_ITEMS_THRESHOLD = 100


def default_hidden_sizes(n_items: int) -> tuple[int, int]:
    """(h, h') of the reference: (128, 128) up to 100 items, (256, 512) above."""
    if n_items > WIDE_ITEMS_THRESHOLD:
        return 256, 512
    return 128, 128


class VelocityField(nn.Module):
    """v(z0, z_t, t) = Q(z0) ⊙ z_t · σ(t).

    Parameter names (``fc1…fc3``, ``fct1``, ``fct2``) match the public code's state dict,
    so its released flows load with :func:`load_reference_flow`.
    """

    def __init__(self, n_items: int, hidden: int | None = None, hidden2: int | None = None):
        super().__init__()
        default_h, default_h2 = default_hidden_sizes(n_items)
        hidden = hidden or default_h
        hidden2 = hidden2 or (default_h2 if hidden == default_h else hidden)
        self.n_items = n_items
        self.fc1 = nn.Linear(n_items, hidden)
        self.fc2 = nn.Linear(hidden, hidden2)
        self.fc3 = nn.Linear(hidden2, n_items)
        self.fct1 = nn.Linear(1, hidden)
        self.fct2 = nn.Linear(hidden, 1)

    def q(self, z0: Tensor) -> Tensor:
        """Q(z0): ``[..., m] -> [..., m]``."""
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(z0)))))

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t): ``[..., 1] -> [..., 1]``."""
        return self.fct2(torch.tanh(self.fct1(t)))

    def forward(self, z0: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Velocity ``[P, m]`` at ``z_t [P, m]`` from ``z0 [P, m]`` at times ``t [P, 1]``."""
        return self.q(z0) * z_t * self.sigma(t)


def load_reference_flow(
    source: str | Path | Mapping[str, Tensor], n_items: int | None = None
) -> VelocityField:
    """Build a :class:`VelocityField` from the public code's flow state dict.

    ``source`` is a ``.pth`` file saved with ``torch.save(model.state_dict())`` (loaded with
    ``weights_only=True``) or an already loaded mapping. Widths are read from the weights.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BundleflowError(f"{path}: flow file not found; pass the path to a flow .pth")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise BundleflowError(
                f"{path}: not a loadable flow state dict ({type(err).__name__}); "
                "bundleflow only loads tensors (weights_only=True), never pickled code"
            ) from err
        name = str(path)
    else:
        state, name = dict(source), "flow state dict"
    keys = {
        f"{layer}.{kind}"
        for layer in ("fc1", "fc2", "fc3", "fct1", "fct2")
        for kind in ("weight", "bias")
    }
    if not isinstance(state, Mapping):
        raise BundleflowError(f"{name}: holds a {type(state).__name__}, not a flow state dict")
    missing = sorted(keys - set(state))
    if missing:
        raise BundleflowError(f"{name}: missing keys {missing}; expected the reference MLP's")
    for key in sorted(keys):
        value = state[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise BundleflowError(f"{name}: {key} is not a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise BundleflowError(f"{name}: {key} holds NaN or infinite values")
    if state["fc1.weight"].dim() != 2 or state["fc2.weight"].dim() != 2:
        raise BundleflowError(f"{name}: fc1.weight and fc2.weight must be matrices")
    hidden, items = state["fc1.weight"].shape
    hidden2 = state["fc2.weight"].shape[0]
    if min(hidden, items, hidden2) < 1:
        raise BundleflowError(f"{name}: empty layers (m={items}, h={hidden}, h'={hidden2})")
    if n_items is not None and items != n_items:
        raise BundleflowError(f"{name}: flow is for m={items} items, the run has m={n_items}")
    field = VelocityField(int(items), int(hidden), int(hidden2))
    expected = field.state_dict()
    for key in sorted(keys):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise BundleflowError(
                f"{name}: {key} has shape {tuple(state[key].shape)}, the reference MLP for "
                f"m={items}, h={hidden}, h'={hidden2} needs {tuple(expected[key].shape)}"
            )
    field.load_state_dict({k: state[k].float() for k in keys})
    return field


@dataclass(frozen=True)
class FlowResult:
    """What the integrator returns for P start points.

    Attributes:
        z_n: ``[P, m]`` Euler end points (no gradient).
        q: ``[P, m]`` Q(z0), differentiable with respect to z0 when grad is enabled.
        int_sigma: ``[]`` or ``[P, 1]`` (reference path) ∫σ on the Euler grid (no gradient).
        log_det: ``[P]`` ΣQ(z0) · ∫σ, the log-density decrease along the flow.
    """

    z_n: Tensor
    q: Tensor
    int_sigma: Tensor
    log_det: Tensor


def _sigma_grid(field: VelocityField, n_steps: int, like: Tensor) -> list[Tensor]:
    # σ(i/N) for i < N, each from a [1, 1] input built as the public code builds t
    # (ones * i / N), so ∫σ is bit-identical to the reference's running sum.
    ones = like.new_ones(1, 1)
    return [field.sigma(ones * i / n_steps).detach() for i in range(n_steps)]


def sigma_grid_integral(
    field: VelocityField, n_steps: int, like: Tensor
) -> tuple[list[Tensor], Tensor]:
    """σ(i/N) for i < N (each ``[1, 1]``) and ∫σ = (1/N) Σ_i σ(i/N) as a 0-d tensor, summed
    in the reference's order (shared by :func:`integrate` and :mod:`bundleflow.maths.fused`)."""
    sigmas = _sigma_grid(field, n_steps, like)
    total = sigmas[0]
    for s in sigmas[1:]:  # N scalars, in the reference's summation order
        total = total + s
    return sigmas, (total / n_steps).reshape(())


def low_precision_q(field: VelocityField, z0: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Q(z0) with the network under autocast in ``dtype`` (None: as is), cast to float32."""
    if dtype is None or dtype == torch.float32:
        return field.q(z0)
    with torch.autocast(z0.device.type, dtype=dtype):
        q = field.q(z0)
    return q.float()


def integrate(
    field: VelocityField,
    z0: Tensor,
    n_steps: int = 5,
    *,
    path: IntegratorPath = "fast",
    enable_grad: bool = True,
    q_dtype: torch.dtype | None = None,
    end_grad: bool = False,
) -> FlowResult:
    """Push start points through the flow with N Euler steps.

    Args:
        field: the (frozen) velocity network.
        z0: ``[P, m]`` start points.
        n_steps: Euler steps N.
        path: ``"fast"``: Q once per point and the closed-form Euler product;
            ``"reference"``: N network calls, as the public code does (its numerics).
        enable_grad: keep the graph from z0 to Q (and so to ``log_det``). Off, nothing
            is differentiable; the end points and bundles never are.
        q_dtype: ``torch.bfloat16``/``torch.float16``: the network's matrix products run
            under autocast in that dtype (fast path only) and Q is returned in float32, so
            the Euler product, the trace term and everything after stay float32.
        end_grad: keep the graph from z0 to z_N too (fast path only): z_N = z0·Π(1 + Q·σ_i/N)
            differentiated through z0 and Q (``menu.bundle_grad``). Off, z_N is a constant.
    """
    if path not in ("fast", "reference"):
        raise ValueError(f"path must be 'fast' or 'reference', got {path!r}")
    if end_grad and path != "fast":
        raise ValueError("end_grad needs the fast path")
    with torch.set_grad_enabled(enable_grad and torch.is_grad_enabled()):
        if path == "fast":
            sigmas, int_sigma = sigma_grid_integral(field, n_steps, z0)
            q = low_precision_q(field, z0, q_dtype)  # (P, m): the only network evaluation
            with torch.set_grad_enabled(end_grad and torch.is_grad_enabled()):
                growth = 1 + q * (sigmas[0].reshape(()) / n_steps)
                for s in sigmas[1:]:
                    growth = growth * (1 + q * (s.reshape(()) / n_steps))
                z_n = (z0 if end_grad else z0.detach()) * growth
            log_det = q.sum(dim=-1) * int_sigma
        else:
            dt = 1.0 / n_steps
            ones = z0.new_ones(1, 1)
            z = z0.detach().clone()
            int_sigma = 0
            q = None
            for i in range(n_steps):  # the public code's loop: N full network calls
                t = ones.repeat(z.shape[0], 1) * i / n_steps
                q = field.q(z0)
                sigma_t = field.sigma(t)
                velocity = q * z * sigma_t
                int_sigma = int_sigma + sigma_t.detach()
                z = z.detach().clone() + velocity * dt
            int_sigma = int_sigma / n_steps  # (P, 1)
            z_n = z.detach()
            log_det = q.sum(dim=-1) * int_sigma.reshape(-1)
    return FlowResult(z_n=z_n, q=q, int_sigma=int_sigma, log_det=log_det)


def round_bundles(z_n: Tensor, threshold: float = 0.5) -> Tensor:
    """S = 1[z_N ≥ threshold], in the dtype of ``z_n``; no gradient."""
    return (z_n.detach() >= threshold).to(z_n.dtype)


# ----------------------------------------------------------------------------- Stage-1 data


class MixtureNoise(nn.Module):
    """The Stage-1 source distribution: an equal-weight Gaussian mixture near 0.5.

    Component means are 0.45 + 0.1·sigmoid(U[0,1)) per coordinate, drawn once and kept as
    a buffer so they are saved with the flow; every component has std e^−3.
    """

    def __init__(
        self,
        n_items: int,
        n_components: int = 3,
        log_std: float = -3.0,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        means = 0.45 + 0.1 * torch.sigmoid(torch.rand(n_components, n_items, generator=generator))
        self.register_buffer("means", means)
        self.log_std = log_std

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``[n, m]`` draws."""
        means: Tensor = self.means
        comp = torch.randint(
            means.shape[0], (n,), generator=generator, device=means.device
        )  # equal weights
        noise = torch.randn(n, means.shape[1], generator=generator, device=means.device)
        return means[comp] + math.exp(self.log_std) * noise


def flow_pairs(
    noise: MixtureNoise,
    n: int,
    *,
    target_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Stage-1 pairs: z0 from the mixture, z1 ~ N(1[z0 ≥ 0.5], target_std² I)."""
    z0 = noise.sample(n, generator=generator)
    corners = (z0 >= 0.5).to(z0.dtype)
    z1 = corners + target_std * torch.randn(
        z0.shape, generator=generator, device=z0.device, dtype=z0.dtype
    )
    return z0, z1


def rectified_flow_loss(field: VelocityField, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """mean_batch ||(z1 − z0) − v(z0, z_t, t)||², z_t = t z1 + (1 − t) z0; ``t`` is ``[P, 1]``."""
    z_t = t * z1 + (1 - t) * z0
    residual = (z1 - z0) - field(z0, z_t, t)
    return residual.pow(2).sum(dim=-1).mean()


# ----------------------------------------------------------------------------- state


def flow_state(field: VelocityField, noise: MixtureNoise) -> tuple[dict[str, Tensor], dict]:
    """The flow and its Stage-1 mixture as tensors plus a JSON-able header (for checkpoints)."""
    tensors = {f"field.{k}": v for k, v in field.state_dict().items()}
    tensors["noise.means"] = noise.means
    header = {
        "n_items": field.n_items,
        "hidden": field.fc1.out_features,
        "hidden2": field.fc2.out_features,
        "noise_log_std": noise.log_std,
    }
    return tensors, header


def flow_from_state(
    tensors: Mapping[str, Tensor], header: Mapping
) -> tuple[VelocityField, MixtureNoise]:
    """Inverse of :func:`flow_state`."""
    field = VelocityField(header["n_items"], header["hidden"], header["hidden2"])
    field.load_state_dict(
        {k.removeprefix("field."): v for k, v in tensors.items() if k.startswith("field.")}
    )
    means = tensors["noise.means"]
    noise = MixtureNoise(header["n_items"], means.shape[0], header["noise_log_std"])
    noise.load_state_dict({"means": means})
    return field, noise
