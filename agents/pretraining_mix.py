"""The pretraining mix: the base model's own training loss, on a fresh batch of its training data,
added to a fine-tuning update (``finetune.pretrain_loss_weight``; off by default).

InstructGPT's "PPO-ptx" mixes the pretraining gradients into RL fine-tuning so that the policy keeps
fitting the data it was trained on while the reward moves it. Here the term is the model's own
:meth:`~refit_gym.models.base.BaseModel.training_loss` (what ``refit-gym pretrain`` minimises) on
``pretrain_batch_size`` examples drawn by the model's own ``training_batches`` (a user's history for
the collaborative-filtering models, a user's window for the sequential ones), from the training
interactions only. It is an exact gradient of a supervised objective: an agent that mixes it sees (c).

Where the term differs from pretraining, and why:

* **Timesteps are uniform.** Pretraining's loss-aware importance sampler is training state that a
  checkpoint does not keep; with DiffRec's reweighting a uniform draw estimates the same objective.
* **Each update draws its batch from a fresh shuffle** seeded from the update's own generator (so
  batches are drawn with replacement across updates, not in epochs): a resumed run needs only the
  trainer's generator state to continue exactly.
* **Dropout is on for this term** (the model is in train mode for its forward, as in pretraining); the
  rest of the update runs in eval mode, as the policy always does.
* **Data-parallel**, every process computes the term on the whole batch, with the same draws as one
  process would make: the processes' gradients of it are equal, so their average is exactly the
  one-process gradient (the term's work is not divided between the processes; sharding the batch
  would draw each shard's timesteps and noise apart from the one-process run's).
"""

from __future__ import annotations

from typing import Optional

import torch

from refit_gym.data.history import SequenceTable
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion import TimestepSampler
from refit_gym.models.base import BaseModel


class PretrainingMix:
    """Draws a batch of training examples and returns the model's own training loss on it.

    Args:
        interactions: the training interactions (the only data the term reads).
        batch_size: training examples per batch.
        steps: the diffusion's number of steps T (the uniform timestep draw).
        reweight: the pretraining loss's reweighting (the experiment's ``diffusion.reweight``).
        device: where the training sequences are held.
    """

    def __init__(self, interactions: TrainingInteractions, batch_size: int, steps: int, reweight: bool = True,
                 device: torch.device | str = "cpu") -> None:
        self.table = SequenceTable(interactions.train_sequences, interactions.n_items, device)
        self.batch_size, self.reweight = int(batch_size), bool(reweight)
        self.timesteps = TimestepSampler(steps, method="uniform")

    def loss(self, model: BaseModel, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The mean training loss of ``model`` on a fresh batch (differentiable); ``generator``
        (the update's) seeds the draw, or torch's global generator when None."""
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        draws = torch.Generator().manual_seed(seed)  # the data order, timesteps and noise of this batch
        batch = next(iter(model.training_batches(self.table, self.batch_size, draws)))
        was_training = model.training
        model.train()
        try:
            return model.training_loss(batch, self.timesteps, self.reweight, draws)
        finally:
            model.train(was_training)


__all__ = ["PretrainingMix"]
