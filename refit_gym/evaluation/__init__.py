"""Full-ranking evaluation (the ``cf`` and ``sequential`` protocols): metrics, accumulator and the evaluator."""

from refit_gym.evaluation.evaluator import (
    EvaluationProtocol,
    EvaluationResult,
    Recommender,
    as_protocol,
    check_recommender,
    evaluate,
)
from refit_gym.evaluation.metrics import (
    MetricAccumulator,
    mask_and_rank,
    metric_names,
    ranking_metrics,
    sequential_metrics,
    top_k_lowest_id_first,
)

__all__ = [
    "EvaluationProtocol",
    "EvaluationResult",
    "as_protocol",
    "check_recommender",
    "MetricAccumulator",
    "Recommender",
    "evaluate",
    "mask_and_rank",
    "metric_names",
    "ranking_metrics",
    "sequential_metrics",
    "top_k_lowest_id_first",
]
