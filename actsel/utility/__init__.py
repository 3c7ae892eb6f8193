"""How useful each candidate is as an in-context demonstration: metrics, fast scoring and estimators."""

from actsel.utility.estimators import (
    UTILITY_ESTIMATORS,
    EstimatorConfig,
    estimate_utility,
    register_estimator,
    sample_prompt_demos,
)
from actsel.utility.metrics import METRICS, default_metric
from actsel.utility.result import UtilityResult
from actsel.utility.scoring import score_prompts, score_with_prefix

__all__ = [
    "METRICS", "UTILITY_ESTIMATORS", "EstimatorConfig", "UtilityResult", "default_metric", "estimate_utility",
    "register_estimator", "sample_prompt_demos", "score_prompts", "score_with_prefix",
]
