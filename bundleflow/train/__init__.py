"""Training: the config schema and presets, the plan (one decision per run: precision, mode,
kernels, layout), data for a run, Stage 1 (the flow) and Stage 2 (the menu) as trainer classes
with one step each, checkpoints, run directories and the pipeline that runs a whole job.
Imports ``evaluation`` and below; ``perf`` and ``cli`` call into it."""
