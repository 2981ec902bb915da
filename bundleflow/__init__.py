"""bundleflow: BundleFlow menus for single-bidder combinatorial auctions.

The package is layered; a module imports only from its own layer or the ones listed before it
(``tests/test_layout.py`` checks this):

1. foundation, at the top level: ``errors``, ``paths``, ``atomic`` (no bundleflow imports);
2. ``system``: the machine and what we observe on it (devices, doctor, telemetry, timing,
   progress, trackers, process groups) and ``valuations``: bidders, data generators, files;
3. ``maths``: the flow, menus, revenue, the fused kernels, Adam, the exact polish;
4. ``evaluation``: baselines, the posted-price option, the frozen mechanism, reports;
5. ``train``: the config, the plan, the two stages, checkpoints, run directories, the pipeline;
6. ``perf``: profiling and benchmarks of the trainer's steps;
7. ``cli``: argument parsing and printing only; each command calls one function below it.
"""

from loguru import logger

__version__ = "0.1.0"

# A library stays quiet until an entry point (the CLI) enables and configures logging.
logger.disable("bundleflow")
