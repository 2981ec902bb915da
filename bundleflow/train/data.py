"""Training data for a run: load or generate, split, normalise money, sample batches."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from bundleflow.atomic import atomic_write_bytes
from bundleflow.errors import BundleflowError
from bundleflow.evaluation.baselines import FittedBaselines, fit_baselines
from bundleflow.paths import default_cache_dir
from bundleflow.train.config import DataConfig
from bundleflow.valuations import io as data_io
from bundleflow.valuations import known as known_settings
from bundleflow.valuations import known_data


@dataclass
class RunData:
    """Valuations of one run. ``train``/``val`` are normalised (money / ``scale``) on the
    training device; ``test`` and ``train_user`` stay in the user's units on the CPU.

    Additive runs have no stored training set: batches are fresh U[0,1]^m draws.
    """

    kind: str  # "xor" or "additive"
    n_items: int
    scale: float
    val: Tensor
    test: Tensor
    train_user: Tensor
    train: Tensor | None = None
    info: dict = field(default_factory=dict)
    _baselines: FittedBaselines | None = field(default=None, repr=False)

    def baselines(self) -> FittedBaselines:
        """The posted-price baselines fitted on the training split, once per run (and cached
        on disk by content, :func:`fitted_baselines`): the menu's grand-bundle element, the
        posted-price option beside the menu and the report all use this one fit."""
        if self._baselines is None:
            self._baselines = fitted_baselines(self.train_user)
        return self._baselines

    def normalise(self, valuations: Tensor) -> Tensor:
        """User units -> normalised money."""
        if self.kind == "additive":
            return valuations / self.scale
        out = valuations.clone()
        out[..., -1] /= self.scale
        return out

    def denormalise(self, valuations: Tensor) -> Tensor:
        """Normalised money -> user units (the inverse of :meth:`normalise`)."""
        if self.kind == "additive":
            return valuations * self.scale
        out = valuations.clone()
        out[..., -1] *= self.scale
        return out


def _money_scale(train_user: Tensor, kind: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        if not override > 0:
            raise BundleflowError(f"config key 'data.money_scale' must be > 0, got {override}")
        return float(override), "config data.money_scale"
    if kind == "additive":
        return float(train_user.sum(dim=1).double().mean()), "training mean of Σv"
    return float(train_user[..., -1].amax(dim=1).double().mean()), "training mean of max_k b_k"


def load_run_data(
    cfg: DataConfig,
    device: torch.device,
    *,
    data_file: str | None = None,
    progress=None,
    dataset: data_io.Dataset | None = None,
) -> RunData:
    """Resolve the data a config names (``--data`` overrides) and prepare it for training.

    ``dataset``: the file's contents when the caller has already read it (the CLI reads a
    ``--data`` file once to take its m)."""
    if cfg.kind == "additive" and data_file is None:
        return _additive(cfg, device)
    dataset, source = _dataset(cfg, data_file, progress, dataset)
    train_user = dataset.part("train")
    val_user = dataset.part("val")
    test_user = dataset.part("test")
    if min(train_user.shape[0], val_user.shape[0], test_user.shape[0]) == 0:
        raise BundleflowError(
            f"{dataset.path}: split sizes {dataset.split.sizes()} leave a part empty; "
            "use more samples"
        )
    scale, scale_source = _money_scale(train_user, "xor", cfg.money_scale)
    data = RunData(
        kind="xor",
        n_items=dataset.n_items,
        scale=scale,
        val=torch.empty(0),
        test=test_user,
        train_user=train_user,
    )
    data.train = data.normalise(train_user).to(device)
    data.val = data.normalise(val_user).to(device)
    data.info = {
        **source,
        "sha256": data_io.file_sha256(dataset.path),
        "split": dataset.split.to_dict(),
        "split_origin": dataset.split.origin,
        "sizes": dataset.split.sizes(),
        "money_scale": scale,
        "money_scale_source": scale_source,
    }
    if "known" in dataset.metadata:  # a known-optimum set (generated or a --data file)
        data.info["known"] = dataset.metadata["known"]
        if "catalogue" in dataset.metadata:  # w_g per bundle: the optimal menu's prices
            data.info["known"] = {**data.info["known"], "catalogue": dataset.metadata["catalogue"]}
    logger.info(
        "data: {} ({} train / {} val / {} test, m={}), money scale {:.4g} ({})",
        dataset.path,
        *dataset.split.sizes().values(),
        dataset.n_items,
        scale,
        scale_source,
    )
    return data


def _dataset(cfg: DataConfig, data_file: str | None, progress, dataset) -> tuple:
    """The data set a config names (a file, a cached known-optimum or CATS set) and where it
    came from, for run.json."""
    if data_file is not None or cfg.kind == "file":
        path = Path(data_file or cfg.path or "")
        if dataset is None or Path(dataset.path).resolve() != path.resolve():
            dataset = data_io.load_dataset(path, n_items=cfg.n_items)
        return dataset, {"kind": "file", "path": str(path.resolve())}
    if cfg.kind == "known":
        path = known_data.cached_known_dataset(
            known_setting(cfg),
            {"train": cfg.n_samples, "val": cfg.known_val_samples, "test": cfg.known_test_samples},
            cfg.seed,
        )
        dataset = data_io.load_dataset(path)
        return dataset, {
            "kind": "known",
            "path": str(path),
            "generator": dataset.metadata["generator"],
        }
    path = data_io.cached_dataset(
        cfg.dist,
        cfg.n_items,
        cfg.n_samples,
        cfg.seed,
        private_values=cfg.values,
        mode=cfg.mode,
        split=cfg.split,
        progress=progress,
    )
    dataset = data_io.load_dataset(path, n_items=cfg.n_items)
    return dataset, {
        "kind": "cats",
        "path": str(path),
        "generator": dataset.metadata.get("generator"),
    }


def _additive(cfg: DataConfig, device: torch.device) -> RunData:
    """U[0,1]^m: fixed validation and test draws from the data seed, fresh training draws."""
    m = cfg.n_items
    val_user = torch.rand(cfg.additive_val_samples, m, generator=_gen(cfg.seed, 1))
    test_user = torch.rand(cfg.additive_test_samples, m, generator=_gen(cfg.seed, 2))
    fit_user = torch.rand(cfg.additive_val_samples, m, generator=_gen(cfg.seed, 3))
    scale, scale_source = _money_scale(fit_user, "additive", cfg.money_scale)
    data = RunData(
        kind="additive",
        n_items=m,
        scale=scale,
        val=torch.empty(0),
        test=test_user,
        train_user=fit_user,
    )
    data.val = data.normalise(val_user).to(device)
    data.info = {
        "kind": "additive",
        "distribution": f"U[0,1]^{m}",
        "seed": cfg.seed,
        "sizes": {"val": cfg.additive_val_samples, "test": cfg.additive_test_samples},
        "money_scale": scale,
        "money_scale_source": scale_source,
    }
    if m in known_settings.ADDITIVE_UNIFORM_OPTIMA:
        data.info["known"] = known_settings.known_optimum("additive-uniform", n_items=m).to_dict()
    logger.info("data: additive U[0,1]^{}, money scale {:.4g} ({})", m, scale, scale_source)
    return data


def known_setting(cfg: DataConfig) -> known_settings.KnownSetting:
    """The known-optimum setting a ``data:`` section names (kind ``known``)."""
    by_setting = {
        "specialists": {"n_items": cfg.n_items, "high": cfg.specialist_value},
        "unit-demand": {"n_items": cfg.n_items, "low": cfg.unit_low, "high": cfg.unit_high},
        "additive-ddt": {"n_items": cfg.n_items},
        "additive-uniform": {"n_items": cfg.n_items},
        "catalogue": {
            "n_items": cfg.n_items,
            "catalogue_size": cfg.catalogue_size,
            "synergy_max": cfg.synergy_max,
            "catalogue_seed": cfg.catalogue_seed,
        },
    }
    try:
        return known_settings.make_setting(cfg.setting, **by_setting[cfg.setting])
    except ValueError as err:
        raise BundleflowError(f"config section 'data' (setting {cfg.setting}): {err}") from None


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


BASELINES_FORMAT = 2  # 2: revenue ties within 1e-9 relative (issue 27)


def fitted_baselines(train_user: Tensor) -> FittedBaselines:
    """The posted-price baselines fitted on a training split, cached by the split's content
    in ``$BUNDLEFLOW_CACHE/baselines``: every run of the same data fits the same thing, and
    the report and the posted price beside the menu share this one fit."""
    key = f"{data_io.tensor_sha256(train_user)[:24]}-v{BASELINES_FORMAT}"
    path = default_cache_dir() / "baselines" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(path.read_text())
        return FittedBaselines(
            grand_bundle_price=float(saved["grand_bundle_price"]),
            uniform_price=float(saved["uniform_price"]),
            item_prices=torch.tensor(saved["item_prices"], dtype=_DTYPES[saved["dtype"]]),
            size_prices=torch.tensor(saved["size_prices"], dtype=_DTYPES[saved["dtype"]]),
        )
    fitted = fit_baselines(train_user)
    record = {
        "grand_bundle_price": fitted.grand_bundle_price,
        "uniform_price": fitted.uniform_price,
        "item_prices": fitted.item_prices.tolist(),
        "size_prices": fitted.size_prices.tolist(),
        "dtype": str(fitted.item_prices.dtype).removeprefix("torch."),
    }
    if str(fitted.size_prices.dtype) == str(fitted.item_prices.dtype):
        try:  # a read-only cache only costs the next run the fit
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(record).encode())
        except (OSError, BundleflowError) as err:
            logger.debug("baselines not cached in {}: {}", path, err)
    return fitted


_DTYPES = {"float64": torch.float64, "float32": torch.float32}
