"""Bidders and their data: XOR and additive valuations, the batched value oracle, the CATS
generator, the known-optimum families with their exact optima, and the data files (readers,
writers, the data cache). Imports only the foundation (``errors``, ``paths``, ``atomic``)."""
