"""Ready-made runs: functions returning full configs, and the jobs that chain them.

- :mod:`~opd_megatron.recipes.mopd_demo`: the main job (``make demo``): specialise, then unify.
- :mod:`~opd_megatron.recipes.seqkd`: the demo's off-policy baseline (SFT on the routed teachers' samples).
- :mod:`~opd_megatron.recipes.opd_demo`: a single-teacher OPD setup on two built-in domains.
"""
