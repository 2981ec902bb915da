"""bundleflow: BundleFlow menus for single-bidder combinatorial auctions."""

__version__ = "0.1.0"
