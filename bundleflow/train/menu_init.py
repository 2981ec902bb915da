"""How a run's Stage 2 starts: the initial menu (top atoms, pairs of them, the grand bundle),
the posted-price option fitted on the training split and the prices it gives the elements,
and the one recorded noise draw that freezes a menu. Imports ``evaluation`` and below."""

from __future__ import annotations

import torch
from loguru import logger

from bundleflow.evaluation.posted import PostedPrices, fit_posted_prices
from bundleflow.maths.flow import VelocityField
from bundleflow.maths.menu import Menu
from bundleflow.train.config import Config, MenuConfig
from bundleflow.train.data import RunData
from bundleflow.valuations.xor import atoms_and_values

# M for a support point that sits on the corner 1: μ = a + b·sigmoid(10·3) ≈ a + b.
CORNER_LOGIT = 3.0


def build_menu(cfg: Config, data: RunData) -> Menu:
    """The initial menu; with ``menu.grand_bundle_element`` element 0 is the grand bundle
    at the grand-bundle price fitted on the training split (normalised money)."""
    gen = torch.Generator().manual_seed(cfg.stage2.seed)
    m = cfg.menu
    menu = Menu(
        data.n_items,
        m.size,
        m.support,
        loc_offset=m.loc_offset,
        loc_scale=m.loc_scale,
        price_scale=m.price_init,
        generator=gen,
    )
    menu.lottery_weights = m.lottery_weights
    if m.init_inclusion != 0.5:
        shift = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(m.init_inclusion))
        with torch.no_grad():
            menu.means.add_(shift.to(menu.means.dtype))  # P(M > 0) = ρ per item
        logger.info("menu: random elements start with each item in w.p. {:.3g}", m.init_inclusion)
    if m.lottery_weights == "mixture":
        with torch.no_grad():
            menu.logits.zero_()  # even odds over the support points to start with
    if m.init_bundles in ("atoms", "atom_pairs") and data.kind == "xor":
        first = 1 if m.grand_bundle_element else 0
        bundles = top_atoms(data.train_user, m.size - first)
        with torch.no_grad():
            menu.means[first : first + bundles.shape[0]] = (
                CORNER_LOGIT * (2 * bundles[:, None, :] - 1)  # every support point on it
            )
        logger.info(
            "menu: elements {}..{} start as the training split's top atoms",
            first,
            first + bundles.shape[0] - 1,
        )
        rest = first + bundles.shape[0]
        if m.init_bundles == "atom_pairs" and rest < m.size and bundles.shape[0] > 1:
            with torch.no_grad():
                menu.means[rest:] = CORNER_LOGIT * (2 * atom_pairs(bundles, m, rest, gen) - 1)
            logger.info(
                "menu: elements {}..{} start as lotteries over two of those atoms",
                rest,
                m.size - 1,
            )
    if m.grand_bundle_element:
        price = data.baselines().grand_bundle_price / data.scale
        with torch.no_grad():
            menu.means[0].fill_(CORNER_LOGIT)
            menu.prices[0] = price
            if m.grand_bundle_prices:
                u = torch.rand(m.size - 1, generator=gen, dtype=torch.float64)
                menu.prices[1:] = (u * price).to(menu.prices.dtype)
        logger.info(
            "menu: element 0 starts as the grand bundle at price {:.4g}", price * data.scale
        )
    return menu


def top_atoms(train_user: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` distinct atoms (bundles) of the XOR valuations ``[N, K, m+1]`` with the
    largest total value over the split (frequency × value), as 0/1 rows ``[≤ n, m]``."""
    atoms, values = atoms_and_values(train_user)
    flat, vals = atoms.reshape(-1, atoms.shape[-1]), values.reshape(-1)
    real = flat.sum(dim=-1) > 0
    unique, inverse = torch.unique(flat[real], dim=0, return_inverse=True)
    total = torch.zeros(unique.shape[0], dtype=torch.float64)
    total.index_add_(0, inverse, vals[real].double())
    order = torch.argsort(total, descending=True, stable=True)[:n]
    return unique[order].float()


def atom_pairs(
    atoms: torch.Tensor, menu: MenuConfig, first: int, gen: torch.Generator
) -> torch.Tensor:
    """Support-point corners ``[J − first, D, n_items]`` for elements ``first..J−1``: each a
    lottery over two distinct rows of ``atoms [A, n_items]`` (A ≥ 2), the first half of its
    D points on one and the rest on the other; the pairs drawn uniformly by ``gen``."""
    n, A = menu.size - first, atoms.shape[0]
    a = torch.randint(A, (n,), generator=gen)
    b = (a + torch.randint(1, A, (n,), generator=gen)) % A  # a different atom
    half = torch.arange(menu.support) < (menu.support + 1) // 2  # (D,)
    return torch.where(half[None, :, None], atoms[a][:, None, :], atoms[b][:, None, :])


def build_fallback(cfg: Config, data: RunData) -> PostedPrices | None:
    """``menu.fallback`` fitted on the training split, in normalised money (float32)."""
    if cfg.menu.fallback == "none":
        return None
    # the report scores the same fit: one fit per training split (cached by content)
    fitted = data.baselines()
    posted, record = fit_posted_prices(data.train_user, cfg.menu.fallback, fitted)
    logger.info(
        "menu: fallback {} pricing (training revenue {})",
        record["kind"],
        ", ".join(f"{k} {v:.4g}" for k, v in record["train_revenue"].items()),
    )
    return posted.scaled(1.0 / data.scale).to(dtype=torch.float32)


@torch.no_grad()
def price_at_fallback(
    menu: Menu,
    flow: VelocityField,
    fallback: PostedPrices,
    mix_temp: float,
    eps: torch.Tensor,
    rule: str = "expected",
) -> None:
    """``expected``: p_j = Σ_d α_jd·c(S_jd), every element weakly worse than the fallback;
    ``cheapest``: p_j = min over the bundles element j puts mass on (α_jd > 1e-6) of c(S_jd)
    (``menu.lottery_price``). ``eps``: the recorded evaluation noise, so the first
    validation sees these lotteries."""
    device = next(flow.parameters()).device
    lot = menu.to(device).lotteries(flow, mix_temp, eps=eps.to(device))
    cost = fallback.to(device).bundle_cost(lot.bundles)  # (J, D, m) -> (J, D)
    if rule == "cheapest":
        price = torch.where(lot.alpha > 1e-6, cost, torch.inf).amin(dim=-1)
    else:
        price = (lot.alpha * cost).sum(dim=-1)
    menu.prices.copy_(price.to(menu.prices.device))


def eval_noise(shape: tuple[int, ...] | torch.Size, seed: int) -> torch.Tensor:
    """The one recorded noise draw ``[J, D, m]`` that freezes the menu (the posted-price
    start, validation and the final report all see these lotteries)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def menu_like(menu: Menu, state: dict) -> Menu:
    """A menu with ``menu``'s location map holding the tensors of ``state`` (a state dict:
    a shard's rows, all ranks' rows, or a checkpoint's)."""
    return Menu.from_tensors(
        state["means"],
        state["logits"],
        state["std"],
        state["prices"],
        loc_offset=menu.loc_offset,
        loc_scale=menu.loc_scale,
        lottery_weights=menu.lottery_weights,
    )
