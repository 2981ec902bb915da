"""bundleflow: BundleFlow menus for single-bidder combinatorial auctions."""

from loguru import logger

__version__ = "0.1.0"

# A library stays quiet until an entry point (the CLI) enables and configures logging.
logger.disable("bundleflow")
