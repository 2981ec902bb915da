"""Valuations: XOR and additive, the batched value oracle, CATS generation and file IO."""
