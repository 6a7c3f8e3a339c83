"""Full-ranking evaluation (DiffRec's protocol): metrics, accumulator and the evaluator."""

from refit_gym.evaluation.evaluator import EvaluationResult, Recommender, evaluate
from refit_gym.evaluation.metrics import (
    MetricAccumulator,
    mask_and_rank,
    metric_names,
    ranking_metrics,
    sequential_metrics,
)

__all__ = [
    "EvaluationResult",
    "MetricAccumulator",
    "Recommender",
    "evaluate",
    "mask_and_rank",
    "metric_names",
    "ranking_metrics",
    "sequential_metrics",
]
