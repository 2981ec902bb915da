"""The machine and what we observe on it: devices and the doctor that explains them, the torch
build table, GPU telemetry, step timing, progress lines, metric trackers and the process-group
helpers. Imports only the foundation (``bundleflow.errors``, ``paths``, ``atomic``)."""
