"""Measuring the trainer: ``bundleflow profile`` (one run's steps under the profiler) and
``bundleflow bench`` (the Stage-2 step against the reference path, side by side). Built on
``train`` and below; nothing below imports it."""
