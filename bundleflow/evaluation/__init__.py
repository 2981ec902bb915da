"""Judging mechanisms: the posted-price baselines and their fitting, the posted-price option
offered beside a menu, the frozen mechanism (hard argmax, IR), revenue with confidence
intervals against baselines and known optima, and the report. Imports ``maths`` and below."""
