"""`bundleflow presets` (what ``--preset`` accepts) and `bundleflow config` (the resolved config).

Both read only YAML: no data is loaded or generated and no device is touched, so they answer
at once and show what a run would use before it starts.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml
from loguru import logger

from bundleflow.cli.options import add_config_args
from bundleflow.train import config as cfg


def register(sub: argparse._SubParsersAction) -> None:
    doc = "list the presets --preset accepts, with the line that describes each"
    p = sub.add_parser("presets", help=doc, description=doc)
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {name, description, path}"
    )
    p.set_defaults(func=cmd_presets)

    doc = "print the resolved config (defaults < preset < --set < flags) as YAML"
    p = sub.add_parser(
        "config",
        help=doc,
        description=doc + "; the output is itself a preset: save it and pass it to --preset",
    )
    add_config_args(p)
    p.set_defaults(func=cmd_config)


def cmd_presets(args: argparse.Namespace) -> int:
    names = cfg.preset_names()
    paths = [cfg.CONFIG_DIR / f"{name}.yaml" for name in names]
    rows = [
        {"name": name, "description": cfg.preset_description(path), "path": str(path)}
        for name, path in zip(names, paths, strict=True)
    ]
    logger.info(
        "presets in {} (accelerate launch configs in {})",
        cfg.CONFIG_DIR,
        cfg.CONFIG_DIR / "accelerate",
    )
    if args.json:
        sys.stdout.write(json.dumps({"presets": rows}) + "\n")
        return 0
    width = max((len(name) for name in names), default=0)
    sys.stdout.writelines(f"{r['name']:<{width}}  {r['description']}\n" for r in rows)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from bundleflow.train.launch import DEFAULT_PRESET, take_data_file

    overrides = cfg.parse_set(args.overrides)
    if args.device:
        overrides["device"] = args.device
    if args.data:  # as `train --data FILE`: the file's path, m and money scale
        take_data_file(args.data, overrides)
    config = cfg.load_config(args.preset or DEFAULT_PRESET, overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(config), sort_keys=False))
    return 0
