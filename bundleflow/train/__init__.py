"""Training loops (plain functions) and what they share: run directories, data, metrics."""
