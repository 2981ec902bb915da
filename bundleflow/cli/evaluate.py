"""`bundleflow evaluate | baselines | menu show | menu query`: reading trained runs and data."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.evaluate import baselines_report, evaluate_mechanism, json_safe
from bundleflow.evaluation.menu_view import fallback_record, lottery, purchases
from bundleflow.evaluation.report import format_baselines, format_summary, write_run_report
from bundleflow.paths import CONFIG_FILE, RUN_INFO, runs_root
from bundleflow.train.config import Config, load_config
from bundleflow.train.data import load_run_data
from bundleflow.train.finish import read_mechanism
from bundleflow.valuations import io as data_io

ADDITIVE_EVAL_BATCH = 65536
"""Additive valuations are [N, m]: far smaller per bidder than XOR, so bigger batches."""
PARTS = ("test", "train", "val", "all")


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="hard revenue of a trained run and every baseline on its test split",
        description="Hard revenue of a trained run's frozen menu beside every baseline "
        "(fitted on the training split) on the test split; writes report.md, report.json "
        "and plots into the run directory (not with --data).",
    )
    add_run_argument(ev)
    ev.add_argument("--data", help="evaluate on this file's split instead (no report written)")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.set_defaults(func=cmd_evaluate)

    base = sub.add_parser(
        "baselines",
        help="fit every baseline on a data file's training split, score on its test split",
        description="Grand bundle, uniform item price, item pricing and bundle-size pricing "
        "fitted on the file's training split and scored on its test split (the file's own "
        "split, else the reference split: first 95%% train, last 5%% test), with the upper "
        "bound E[max value].",
    )
    base.add_argument("--data", required=True, help="a data file (ours, reference .pt/zip, CATS)")
    base.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    base.set_defaults(func=cmd_baselines)

    menu = sub.add_parser("menu", help="inspect a trained menu")
    menu_sub = menu.add_subparsers(dest="menu_command", metavar="ACTION")
    show = menu_sub.add_parser("show", help="the frozen mechanism: bundles, lotteries, prices")
    add_run_argument(show)
    show.add_argument("--json", action="store_true")
    show.add_argument("--top", type=int, default=20, help="elements to list (by price)")
    show.set_defaults(func=cmd_menu_show)
    query = menu_sub.add_parser(
        "query",
        help="what each valuation buys and pays",
        description="Plays the run's frozen menu against a data file's valuations: the element "
        "each one buys (or walk-away), its lottery, the payment and the utility.",
    )
    add_run_argument(query)
    query.add_argument("--data", help="a data file (default: the data the run was trained on)")
    query.add_argument(
        "--split", choices=PARTS, default="test", help="which part of the file (default: test)"
    )
    query.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    query.add_argument("--limit", type=int, default=20, help="valuations listed in the text")
    query.set_defaults(func=cmd_menu_query)
    menu.set_defaults(func=lambda args: menu.print_help(sys.stderr) or 2)


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    """The run directory, positional or as ``--run`` (evaluate, menu show, menu query)."""
    parser.add_argument("run", nargs="?", metavar="RUN_DIR", help="a run directory")
    parser.add_argument("--run", dest="run_flag", metavar="RUN_DIR", help="the same, as a flag")


def run_dir_arg(args: argparse.Namespace) -> Path:
    """The one run directory given (RUN_DIR or --run RUN_DIR)."""
    if args.run and args.run_flag and Path(args.run) != Path(args.run_flag):
        raise BundleflowError(
            f"two run directories, {args.run} and --run {args.run_flag}; give one of them"
        )
    if not (args.run or args.run_flag):
        raise BundleflowError(
            f"no run directory given; pass RUN_DIR or --run RUN_DIR (`ls {runs_root()}` lists them)"
        )
    return Path(args.run or args.run_flag)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text + "\n")


def _run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise BundleflowError(f"{run_dir}: not a bundleflow run directory (no {CONFIG_FILE})")
    return load_config(str(path))


def run_data_file(run_dir: Path) -> str | None:
    """The data file a run was trained on with ``--data`` (recorded in ``run.json``), else None
    (the run's config names its data)."""
    path = run_dir / RUN_INFO
    if not path.is_file():
        return None
    data = json.loads(path.read_text()).get("data") or {}
    return data.get("path") if data.get("kind") == "file" else None


def eval_batch(config: Config, kind: str) -> int:
    return ADDITIVE_EVAL_BATCH if kind == "additive" else config.eval.batch_size


def cmd_evaluate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    run_dir = run_dir_arg(args)
    mech = read_mechanism(run_dir)  # first: it says what is wrong with a path that is no run
    config = _run_config(run_dir)
    data_file = args.data or run_data_file(run_dir)
    data = load_run_data(config.data, torch.device("cpu"), data_file=data_file)
    report = evaluate_mechanism(
        mech,
        data.test,
        data.train_user,
        batch_size=eval_batch(config, data.kind),
        fitted=data.baselines(),  # the training run's fit (cached)
        known=data.info.get("known"),  # paired ratio to the optimum on these test valuations
    )
    report["run"] = str(run_dir)
    # This command's own time, apart from the training run's wall time (kept below).
    report.update(evaluation_time=time.monotonic() - started, evaluation_device="cpu")
    if args.data is None:
        previous = run_dir / "report.json"
        if previous.is_file():  # keep what training recorded (wall time, device, stage 2)
            saved = json.loads(previous.read_text())
            keep = ("device", "device_name", "wall_time", "segments", "stage2", "step_plan")
            report.update({k: saved[k] for k in keep if k in saved})
        write_run_report(run_dir, report)
    if args.json:
        _write_stdout(json.dumps(json_safe(report), allow_nan=False))
    else:
        _write_stdout(format_summary(report))
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    dataset = data_io.load_dataset(args.data)
    train, test = dataset.part("train"), dataset.part("test")
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise BundleflowError(
            f"{args.data}: split sizes {dataset.split.sizes()} leave the training or test part "
            "empty; use more samples or re-create the file with another --split"
        )
    report = baselines_report(train, test)
    report.update(data=str(args.data), split=dataset.split.sizes(), n_items=dataset.n_items)
    if args.json:
        _write_stdout(json.dumps(json_safe(report), allow_nan=False))
    else:
        _write_stdout(format_baselines(report))
    return 0


def cmd_menu_show(args: argparse.Namespace) -> int:
    mech = read_mechanism(run_dir_arg(args))
    J, D, m = mech.bundles.shape
    elements = [
        {"element": j, "price": float(mech.prices[j]), "lottery": lottery(mech, j)}
        for j in range(J)  # presentation only, not a training path
    ]
    if args.json:
        payload = {
            "menu_size": J,
            "support": D,
            "n_items": m,
            "money_scale": mech.money_scale,
            "mix_temp": mech.mix_temp,
            "elements": elements,
            "fallback": fallback_record(mech),
        }
        _write_stdout(json.dumps(payload))
        return 0
    order = sorted(elements, key=lambda e: -e["price"])[: args.top]
    lines = [
        f"frozen menu: {J} elements × {D} support points, {m} items (top {len(order)} by price)"
    ]
    lines += [f"  #{e['element']:<5} price {e['price']:10.4g}  {_lottery_text(e)}" for e in order]
    if mech.fallback is not None:
        lines.append(f"  #{J:<5} fallback: any atom at the fitted {mech.fallback.kind} prices")
    _write_stdout("\n".join(lines))
    return 0


def _lottery_text(element: dict) -> str:
    return "; ".join(
        f"{p['prob']:.3f}:{{{','.join(map(str, p['bundle']))}}}" for p in element["lottery"]
    )


def _query_valuations(args: argparse.Namespace, run_dir: Path) -> tuple[torch.Tensor, int, str]:
    """The valuations of ``--split`` (user units), the file index of the first, the source."""
    data_file = args.data or run_data_file(run_dir)
    if data_file is None:
        config = _run_config(run_dir)
        if config.data.kind == "additive":
            data = load_run_data(config.data, torch.device("cpu"))
            if args.split != "test":
                raise BundleflowError(
                    f"{run_dir}: an additive run keeps only its test draws; use --split test "
                    "or pass --data"
                )
            return data.test, 0, "additive test draws"
        if config.data.kind == "file":
            path = Path(config.data.path or "")
        else:
            path = data_io.cached_dataset(
                config.data.dist,
                config.data.n_items,
                config.data.n_samples,
                config.data.seed,
                private_values=config.data.values,
                mode=config.data.mode,
                split=config.data.split,
            )
    else:
        path = Path(data_file)
    dataset = data_io.load_dataset(path)
    if args.split == "all":
        return dataset.valuations, 0, str(path)
    start, _ = getattr(dataset.split, args.split)
    return dataset.part(args.split), start, str(path)


def cmd_menu_query(args: argparse.Namespace) -> int:
    run_dir = run_dir_arg(args)
    mech = read_mechanism(run_dir)
    valuations, offset, source = _query_valuations(args, run_dir)
    if valuations.dim() == 3 and valuations.shape[-1] - 1 != mech.n_items:
        raise BundleflowError(
            f"{source}: valuations over {valuations.shape[-1] - 1} items, the menu of {run_dir} "
            f"sells {mech.n_items}; pass the data the run was trained on"
        )
    outcome = purchases(mech, valuations, offset)
    rows, J = outcome.rows, mech.menu_size
    summary = {"run": str(run_dir), "data": source, "split": args.split, **outcome.stats}
    if args.json:
        elements = {
            str(j): {"price": float(mech.prices[j]), "lottery": lottery(mech, j)}
            for j in outcome.bought
        }
        payload = {**summary, "valuations": rows, "elements": elements}
        if mech.fallback is not None:
            payload["fallback"] = fallback_record(mech)
        _write_stdout(json.dumps(json_safe(payload)))
        return 0
    lines = [
        f"{source} ({args.split}): {len(rows)} valuations, revenue {summary['revenue']:.5g}, "
        f"buy rate {summary['buy_rate']:.3f}; first {min(args.limit, len(rows))}:"
    ]
    for row in rows[: args.limit]:
        if row["element"] is None:
            lines.append(f"  valuation {row['index']:>6}: walks away, pays 0")
            continue
        if row["element"] == J:
            lines.append(
                f"  valuation {row['index']:>6}: buys at the posted {mech.fallback.kind} prices "
                f"(option #{J}), pays {row['payment']:.5g} (utility {row['utility']:.4g})"
            )
            continue
        lot = _lottery_text({"lottery": lottery(mech, row["element"])})
        lines.append(
            f"  valuation {row['index']:>6}: element #{row['element']} pays "
            f"{row['payment']:.5g} (utility {row['utility']:.4g})  {lot}"
        )
    _write_stdout("\n".join(lines))
    return 0
