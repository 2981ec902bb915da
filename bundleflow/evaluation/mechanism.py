"""A trained menu frozen into an explicit mechanism: what every report, IR check and export uses.

Freezing draws the noise once, pushes the support points through the flow and records the
bundles S_jd, the probabilities α_jd and the prices p_j (in the user's money units), with
the noise draw and the temperatures used. The frozen object needs neither the flow nor
the menu's parameters, saves to one safetensors file with JSON metadata, and gives the
same lotteries every time (the reference redraws ε for every test batch instead).

With a fallback (``menu.fallback``), the posted prices are option J after the J elements:
the bidder may buy any atom at them instead (see :mod:`bundleflow.evaluation.posted`); they are
saved in the same file. Files without them load as menus without a fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from bundleflow import __version__
from bundleflow.atomic import atomic_path
from bundleflow.errors import BundleflowError
from bundleflow.evaluation.posted import PostedPrices
from bundleflow.maths.flow import IntegratorPath, VelocityField
from bundleflow.maths.menu import Menu, lottery_utilities
from bundleflow.maths.revenue import hard_outcome

MECHANISM_FORMAT = 1
_META_KEY = "bundleflow.mechanism"  # on-disk key of mechanism.safetensors: never renamed
_TENSORS = ("bundles", "alpha", "prices", "eps")
_FALLBACK_TENSORS = {"fallback_item_prices": "item_prices", "fallback_size_prices": "size_prices"}
"""Optional tensors: the fallback's item prices ``[m]`` and effective size prices ``[m+1]``."""


@dataclass
class FrozenMechanism:
    """Bundles ``[J, D, m]`` (uint8 0/1), α ``[J, D]``, prices ``[J]`` and the noise ``[J, D, m]``.

    ``prices`` are in the user's money units (``money_scale`` × the menu's normalised
    prices); utilities and payments are too, and so is ``fallback``, the posted prices
    offered as option J (None: a plain menu).
    """

    bundles: Tensor
    alpha: Tensor
    prices: Tensor
    eps: Tensor
    mix_temp: float
    inv_temp: float | None = None
    n_steps: int = 5
    money_scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    fallback: PostedPrices | None = None

    @classmethod
    @torch.no_grad()
    def freeze(
        cls,
        menu: Menu,
        flow: VelocityField,
        mix_temp: float,
        *,
        inv_temp: float | None = None,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
        n_steps: int = 5,
        path: IntegratorPath = "fast",
        money_scale: float = 1.0,
        meta: dict[str, Any] | None = None,
        fallback: PostedPrices | None = None,
    ) -> FrozenMechanism:
        """Freeze ``menu`` with one noise draw (``eps`` or a fresh one from ``generator``).

        ``mix_temp`` is the mixture temperature the probabilities are computed with (the
        final λ of training, in the menu's units); ``inv_temp``, the final money λ, is
        recorded for the record only: the hard mechanism does not use it. ``fallback``:
        posted prices in the menu's units (scaled by ``money_scale`` like the prices).
        """
        if eps is None:
            eps = menu.draw_noise(generator)
        lot = menu.lotteries(flow, mix_temp, eps=eps, n_steps=n_steps, path=path)
        return cls(
            bundles=lot.bundles.to(torch.uint8),
            alpha=lot.alpha.detach().clone(),
            prices=(menu.prices.detach() * money_scale).clone(),
            eps=eps.detach().clone(),
            mix_temp=float(mix_temp),
            inv_temp=None if inv_temp is None else float(inv_temp),
            n_steps=n_steps,
            money_scale=float(money_scale),
            meta=dict(meta or {}),
            fallback=None
            if fallback is None
            else fallback.to(menu.prices.device, menu.prices.dtype).scaled(money_scale),
        )

    @property
    def menu_size(self) -> int:
        """J, the learned elements (a fallback is option J, after them)."""
        return int(self.prices.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.bundles.shape[-1])

    def to(self, device: torch.device | str) -> FrozenMechanism:
        return FrozenMechanism(
            bundles=self.bundles.to(device),
            alpha=self.alpha.to(device),
            prices=self.prices.to(device),
            eps=self.eps.to(device),
            mix_temp=self.mix_temp,
            inv_temp=self.inv_temp,
            n_steps=self.n_steps,
            money_scale=self.money_scale,
            meta=dict(self.meta),
            fallback=None if self.fallback is None else self.fallback.to(device),
        )

    @torch.no_grad()
    def utilities(self, valuations: Tensor, **oracle_kw) -> Tensor:
        """u ``[B, J]`` in the user's units (XOR ``[B, K, m+1]`` or additive ``[B, m]`` input)."""
        bundles = self.bundles.to(self.alpha.dtype)
        return lottery_utilities(bundles, self.alpha, self.prices, valuations, **oracle_kw)

    @torch.no_grad()
    def play(self, valuations: Tensor, *, batch_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
        """What each bidder does, in batches of ``batch_size`` (results on the mechanism's device).

        Returns ``choice [N]`` (−1 = walks away, J = the fallback's posted prices),
        ``payment [N]`` and the utility the bidder realises ``[N]`` (0 for a walk-away;
        negative would be an IR violation).
        """
        choices, payments, realised = [], [], []
        for start in range(0, valuations.shape[0], batch_size):  # batches bound memory
            batch = valuations[start : start + batch_size].to(self.prices.device)
            u = self.utilities(batch)
            extra = None if self.fallback is None else self.fallback.outcome(batch)
            choice, payment = hard_outcome(u, self.prices, extra)
            if extra is not None:
                u = torch.cat([u, extra[0].to(u.dtype)[:, None]], dim=1)  # (B, J+1)
            chosen_u = u.gather(1, choice.clamp(min=0)[:, None]).squeeze(1)
            choices.append(choice)
            payments.append(payment)
            realised.append(torch.where(choice >= 0, chosen_u, 0.0))
        if not choices:
            empty = self.prices.new_zeros(0)
            return empty.long(), empty, empty
        return torch.cat(choices), torch.cat(payments), torch.cat(realised)

    def outcome(self, valuations: Tensor, *, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
        """``choice [N]`` (−1 = walks away) and ``payment [N]`` (see :meth:`play`)."""
        choice, payment, _ = self.play(valuations, batch_size=batch_size)
        return choice, payment

    def revenue(self, valuations: Tensor, *, batch_size: int = 1024) -> float:
        """Hard revenue: mean payment over ``valuations``."""
        return float(self.outcome(valuations, batch_size=batch_size)[1].mean())

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write one safetensors file atomically (tensors + JSON metadata)."""
        header = {
            "format": MECHANISM_FORMAT,
            "package_version": __version__,
            "mix_temp": self.mix_temp,
            "inv_temp": self.inv_temp,
            "n_steps": self.n_steps,
            "money_scale": self.money_scale,
            "meta": self.meta,
        }
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        for name, attr in _FALLBACK_TENSORS.items():
            value = None if self.fallback is None else getattr(self.fallback, attr)
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> FrozenMechanism:
        """Read a file written by :meth:`save`; a missing or damaged file is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise BundleflowError(f"{path}: frozen mechanism not found; train a run first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path), device=str(device))
            header = json.loads(metadata[_META_KEY])
        except (SafetensorError, KeyError, ValueError, RecursionError, OSError) as err:
            reason = (str(err).splitlines() or [""])[0]
            raise BundleflowError(
                f"{path}: not a bundleflow mechanism file ({type(err).__name__}: {reason})"
            ) from None
        if not isinstance(header, dict):
            raise BundleflowError(f"{path}: the mechanism metadata is not a JSON object")
        if header.get("format") != MECHANISM_FORMAT:
            raise BundleflowError(
                f"{path}: mechanism format {header.get('format')!r}, this bundleflow reads "
                f"{MECHANISM_FORMAT}; upgrade bundleflow"
            )
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise BundleflowError(f"{path}: mechanism file lacks tensors {missing}")
        posted = {attr: tensors.get(name) for name, attr in _FALLBACK_TENSORS.items()}
        fallback = PostedPrices(**posted) if any(t is not None for t in posted.values()) else None
        try:
            inv_temp = header.get("inv_temp")
            mech = cls(
                **{name: tensors[name] for name in _TENSORS},
                mix_temp=float(header["mix_temp"]),
                inv_temp=None if inv_temp is None else float(inv_temp),
                n_steps=int(header["n_steps"]),
                money_scale=float(header["money_scale"]),
                meta=dict(header.get("meta", {})),
                fallback=fallback,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise BundleflowError(
                f"{path}: malformed mechanism metadata ({type(err).__name__}: {err}); "
                "re-export the mechanism from its run"
            ) from None
        mech.validate(path)
        return mech

    def validate(self, source: str | Path = "mechanism") -> None:
        """Shapes agree and numbers are finite; raise :class:`BundleflowError` otherwise."""
        if self.bundles.dim() != 3:
            raise BundleflowError(
                f"{source}: bundles must be [J, D, m], found shape {tuple(self.bundles.shape)}"
            )
        for name in ("alpha", "prices", "eps"):
            if not getattr(self, name).is_floating_point():
                raise BundleflowError(f"{source}: {name} must be floating point")
        if not bool(((self.bundles == 0) | (self.bundles == 1)).all()):
            raise BundleflowError(f"{source}: bundles must hold only 0 and 1")
        J, D, m = self.bundles.shape
        if self.alpha.shape != (J, D) or self.prices.shape != (J,) or self.eps.shape != (J, D, m):
            raise BundleflowError(
                f"{source}: inconsistent shapes bundles {tuple(self.bundles.shape)}, alpha "
                f"{tuple(self.alpha.shape)}, prices {tuple(self.prices.shape)}"
            )
        for name in ("alpha", "prices"):
            if not torch.isfinite(getattr(self, name)).all():
                raise BundleflowError(f"{source}: {name} has NaN or infinite entries")
        if self.fallback is not None:
            self._validate_fallback(source, m)

    def _validate_fallback(self, source: str | Path, m: int) -> None:
        """Item prices ``[m]`` finite and ≥ 0; effective size prices ``[m+1]`` ≥ 0 (``inf``
        = not for sale), non-decreasing, 0 at size 0."""
        item, size = self.fallback.item_prices, self.fallback.size_prices
        for name, t, n in (("item", item, m), ("size", size, m + 1)):
            if t is None:
                continue
            if t.dim() != 1 or t.shape[0] != n or not t.is_floating_point():
                raise BundleflowError(
                    f"{source}: fallback {name} prices must be a float vector of {n}, found "
                    f"{t.dtype} of shape {tuple(t.shape)}"
                )
            if bool(torch.isnan(t).any()) or bool((t < 0).any()):
                raise BundleflowError(f"{source}: fallback {name} prices must be ≥ 0 (no NaN)")
        if item is not None and not bool(torch.isfinite(item).all()):
            raise BundleflowError(f"{source}: fallback item prices must be finite")
        if size is not None and (float(size[0]) != 0.0 or bool((size.diff() < 0).any())):
            raise BundleflowError(
                f"{source}: fallback size prices must be effective prices (0 at size 0, "
                "non-decreasing)"
            )
