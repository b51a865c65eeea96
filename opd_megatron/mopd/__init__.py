"""Multi-teacher on-policy distillation (MOPD): which teacher supervises which rollout, and how.

- :mod:`~opd_megatron.mopd.routing`: specialty (domain label), confidence and pass-rate routers.
- :mod:`~opd_megatron.mopd.mixing`: mixture weights (fixed, per prompt, per token), the teachers'
  per-token confidence statistics and their Jensen-Shannon disagreement.
- :mod:`~opd_megatron.mopd.registry`: builds the teachers of a run from config and checks the set
  before training starts.
- :mod:`~opd_megatron.mopd.orchestrator`: scores a step's micro-batches with the routed teachers
  (co-located ones in turn, remote ones concurrently) and turns a teacher failure into an aborted step.
"""

from opd_megatron.mopd.mixing import js_disagreement, mixture_weights, token_stats
from opd_megatron.mopd.orchestrator import MOPDOrchestrator, StepAborted
from opd_megatron.mopd.registry import build_teachers, validate_mopd_config
from opd_megatron.mopd.routing import ConfidenceRouter, PassRateRouter, SpecialtyRouter

__all__ = [
    "ConfidenceRouter",
    "MOPDOrchestrator",
    "PassRateRouter",
    "SpecialtyRouter",
    "StepAborted",
    "build_teachers",
    "js_disagreement",
    "mixture_weights",
    "token_stats",
    "validate_mopd_config",
]
