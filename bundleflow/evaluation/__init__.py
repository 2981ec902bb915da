"""Judging mechanisms: the posted-price baselines and their fitting, the posted-price option
offered beside a menu, the frozen mechanism (hard argmax, IR) and its records for `menu show`
and `menu query`, revenue with confidence intervals against baselines and known optima, the
report, and finished runs side by side (`bundleflow compare`). Imports ``maths`` and below."""
