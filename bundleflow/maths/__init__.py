"""The mathematics of BundleFlow: the rectified flow and its integrators, lottery menus, soft
and hard revenue, the λ schedule, the fused Stage-2 kernels, the compiled Adam and the exact
price polish. Pure tensor code: imports the foundation, ``system`` and ``valuations`` only."""
