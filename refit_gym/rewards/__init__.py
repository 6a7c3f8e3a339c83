"""Reward library: terms that score a batch of final item scores using training interactions only.

Terms (each a :class:`RewardTerm`; registry names in :data:`REWARD_TERMS`):

- ``loglik`` :class:`HeldOutLogLikelihood` and ``likelihood`` :class:`HeldOutLikelihood`:
  recovery of the held-out training items (the log one is the exact-likelihood objective);
- ``collaborative`` :class:`CollaborativeReward`: the items of the user's top-k similar users;
- ``next_collaborative`` :class:`NextItemCollaborativeReward`: what those users did next after the
  user's last visible item(s) (the sequential scenarios);
- ``recall`` :class:`HeldOutRecall`, ``ndcg`` :class:`HeldOutNDCG`: the naive ranking rewards;
- ``slate`` :class:`SlateReward`: hits / recall / NDCG of the slate the env draws at the end
  (env option ``slate_size``);

combined by :class:`WeightedReward` (built from a config by :func:`build_reward`), plus the
potential-based :class:`HeldOutPotential` shaping (:func:`build_shaping`, off by default).
A term of your own: subclass :class:`RewardTerm` and :func:`register_reward_term` it
(``docs/rewards.md``, "Writing a reward term").
"""

from refit_gym.rewards.base import EpisodeBatch, RewardTerm, StepShaping, TrainingInteractions
from refit_gym.rewards.cache import default_reward_cache_dir, matrix_fingerprint
from refit_gym.rewards.collaborative import CollaborativeReward, collaborative_targets
from refit_gym.rewards.likelihood import HeldOutLikelihood, HeldOutLogLikelihood
from refit_gym.rewards.next_item import NextItemCollaborativeReward, next_item_targets
from refit_gym.rewards.neighbours import (
    SIMILARITIES,
    UserNeighbours,
    clear_memory_cache,
    find_neighbours,
    top_k_similar_users,
)
from refit_gym.rewards.ranking import HeldOutNDCG, HeldOutRecall
from refit_gym.rewards.registry import (
    REWARD_TERMS,
    SHAPINGS,
    build_reward,
    build_shaping,
    normalize_reward_spec,
    register_reward_term,
    reward_spec,
    reward_term_class,
)
from refit_gym.rewards.shaping import HeldOutPotential
from refit_gym.rewards.slate import SlateReward
from refit_gym.rewards.weighted import WeightedReward

__all__ = [
    "CollaborativeReward",
    "EpisodeBatch",
    "HeldOutLikelihood",
    "HeldOutLogLikelihood",
    "HeldOutNDCG",
    "HeldOutPotential",
    "HeldOutRecall",
    "NextItemCollaborativeReward",
    "REWARD_TERMS",
    "RewardTerm",
    "SHAPINGS",
    "SIMILARITIES",
    "SlateReward",
    "StepShaping",
    "TrainingInteractions",
    "UserNeighbours",
    "WeightedReward",
    "build_reward",
    "build_shaping",
    "clear_memory_cache",
    "collaborative_targets",
    "next_item_targets",
    "default_reward_cache_dir",
    "find_neighbours",
    "matrix_fingerprint",
    "normalize_reward_spec",
    "register_reward_term",
    "reward_term_class",
    "reward_spec",
    "top_k_similar_users",
]
