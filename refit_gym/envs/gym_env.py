"""The single-user Gymnasium front: ``gym.make("ReFiT-ML1M-v0")``."""

from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np

from refit_gym.envs.factory import build_env_parts
from refit_gym.envs.rendering import render_rows
from refit_gym.envs.spaces import observation_to_numpy, options_value, single_action_space, single_observation_space
from refit_gym.errors import ConfigError


class DenoisingEnv(gym.Env):
    """The reverse (denoising) chain of a pretrained diffusion recommender, for one user.

    An episode takes one user's training history, hides part of it (the held-out items), and lets
    the agent run the last ``k`` steps of the base model's reverse diffusion chain. The final
    state ``x_0`` scores every item (``model.item_scores(x_0)``: the state itself for DiffRec,
    T-DiffRec and CF-Diff); the reward measures how well those scores recover
    the held-out training items (and whatever other terms the reward spec names). The agent is
    typically the pretrained denoiser itself with an exploration head (ReFiT, arXiv 2511.06937).
    The batched implementation is :class:`~refit_gym.envs.core.DenoisingMDP`; this class is its
    ``B = 1`` front, and row 0 of the vector env with the same seed follows the same trajectory.

    ## Action space

    ``Box(-b, b, (d,), float32)``, ``d = state_dim`` of the base model (``n_items`` for DiffRec,
    T-DiffRec and CF-Diff), ``b = action_bound`` (default 10; DiffRec's outputs lie roughly in
    ``[-1, 2]``). What it means depends on ``action_mode``:

    | action_mode | the action is | next state |
    |---|---|---|
    | ``"x0"`` (default) | the predicted clean vector ``x̂_0`` (the denoiser's output) | ``q_posterior_mean(x̂_0, x_t) + σ_t z``, ``z`` from the env's seeded generator; ``σ_t`` = the schedule's posterior std (or ``transition_std``); no noise at the last step |
    | ``"x_prev"`` | the next state ``x_{t-1}`` itself (DDPO-style) | the action (deterministic) |

    Actions are validated (shape ``(d,)``, a floating dtype, finite) and then clipped to
    ``[-b, b]``; float64 / float16 actions are cast to float32. A bad action raises
    :class:`~refit_gym.errors.ActionError` (a ``ValueError``) and leaves the state unchanged.

    ## Observation space

    A ``Dict``:

    | key | space | meaning |
    |---|---|---|
    | ``x_t`` | ``Box(-b, b, (d,), float32)`` | the noisy state (DiffRec: the interaction row) |
    | ``t`` | ``Box(0, k, (1,), int64)`` | remaining reverse steps; the diffusion step is ``t - 1`` |
    | ``user`` | ``Box(0, n_users - 1, (1,), int64)`` | the user id |
    | *conditioning* | per base model | what the base model conditions on, built from the visible history only (none for DiffRec and T-DiffRec; CF-Diff: ``hops``, its 2- and 3-hop rows) |

    ## Rewards

    0 on every step but the last; at ``t = 0`` the bound reward (default: the mean
    log-probability of the held-out items under ``softmax(x_0 / 0.1)``, input items masked) on
    ``model.item_scores(x_0)``; its unweighted terms are in ``info["reward_terms"]``. With
    ``shaping`` on, a potential-based term is added on every step (``info["reward_terms"]["shaping"]``).
    Only training interactions ever enter a reward.

    With ``slate_size=K`` the episode also ends with a *slate*: at ``t = 0`` the env draws ``K``
    distinct items not in the input from Plackett-Luce(``softmax(item_scores(x_0) /
    slate_temperature)``), seeded like the transition noise; ``info["slate"]`` (int64 ``(K,)``)
    and ``info["slate_log_prob"]`` (its exact log-probability, a float) report it, and the
    ``slate`` reward term scores it. The slate is the policy's last action, sampled by the env
    from the policy's final scores (see ``DenoisingMDP``).

    ## Starting state

    The user is drawn uniformly (or given as ``options={"users": u}``). Their chronological
    training history minus the held-out positions is encoded by the base model into the start
    vector (DiffRec: the visible row; T-DiffRec: the recency-weighted row; ``q_sample``d to
    ``noise_steps`` when > 0) and the conditioning; the base model runs the first ``T - k``
    reverse steps (its deterministic mean path, or stochastic with ``stochastic_prefix=True``);
    ``t = k``. The user id is observed but never an input of the model: nothing about the
    held-out items reaches the start state or the conditioning.

    ## Episode end

    Terminates when ``t`` reaches 0, after exactly ``k`` steps (``k = T`` by default: 10 for
    ``ReFiT-Synthetic-v0``, 40 for ``ReFiT-ML1M-v0``, 5 for ``ReFiT-ML1M-CFDiff-v0``). Never
    truncates. Stepping after the end raises :class:`~refit_gym.errors.EpisodeStateError`; call
    ``reset()``.

    ## Typical returns

    With the default reward on ``ReFiT-Synthetic-v0`` (100 episodes, ``reset(seed=s)`` for
    ``s = 0..99``; mean ± standard deviation): the pretrained denoiser as the policy (its ``x0``
    estimate as the action) -4.82 ± 0.62; a freshly initialised denoiser (``pretrained=False``)
    -6.24 ± 0.64; uniformly random actions (``action_space.sample()``, the action space seeded
    with ``s``) -98.5 ± 36 (``benchmarks/reward_scales.py`` measures the first and the last).

    ## Arguments

    | argument | default | meaning |
    |---|---|---|
    | ``action_mode`` | ``"x0"`` | ``"x0"`` or ``"x_prev"`` (above) |
    | ``exposed_steps`` | T | k, the steps the agent takes (1..T) |
    | ``stochastic_prefix`` | ``False`` | sample the hidden prefix instead of its mean |
    | ``transition_std`` | schedule | ``x0``-mode transition noise std (``0`` = deterministic) |
    | ``holdout`` | ``"recent"`` | hide each user's most recent training items, a ``"random"`` subset, or ``"none"`` |
    | ``holdout_fraction`` | 0.25 | fraction hidden, ``round(f L)`` clipped to ``[1, L - 1]`` |
    | ``holdout_count`` | None | hide exactly this many items per user instead (at most ``L - 1``; the sequential scenarios: 1) |
    | ``noise_steps`` | model's (0) | forward-noise the start vector to this step |
    | ``action_bound`` | 10.0 | b |
    | ``reward`` | ``{"loglik": 1}`` | spec for :func:`refit_gym.rewards.build_reward` |
    | ``shaping`` | ``None`` | spec for :func:`refit_gym.rewards.build_shaping` |
    | ``precision`` | ``"fp32"`` | ``"bf16"``: the hidden prefix and the reward's scoring under bfloat16 autocast |
    | ``slate_size`` | ``None`` | K: end each episode with a slate of K items (``None`` / 0: off) |
    | ``slate_temperature`` | 0.02 | temperature of the slate's Plackett-Luce distribution |
    | ``device`` | ``"cpu"`` | where the tensors live (``"auto"``: CUDA when available) |
    | ``dataset`` | the scenario's | another dataset for the scenario's model, e.g. ``"synthetic:n_users=60,n_items=40,seed=0"`` |
    | ``data_dir`` / ``checkpoint`` | | data directory / base-model checkpoint directory |
    | ``pretrained`` | ``True`` | ``False``: freshly initialised, seeded base (tests, benchmarks; no pretraining, no cache) |
    | ``progress`` | stderr is a terminal | a progress bar while the base model is pretrained on first use |
    | ``data`` / ``model`` | | bring your own ``InteractionData`` (and a ``BaseModel`` built for it) |
    | ``render_mode`` | ``None`` | ``"ansi"``: the user's current top-k items with titles |
    | ``render_top_k`` | 10 | items shown by ``render()`` |

    The Gymnasium checker prints one recommendation about the action Box not being
    ``[-1, 1]``: the action is in item-score units on purpose (pass ``action_bound=1.0`` to get
    a ``[-1, 1]`` Box; it clips DiffRec outputs above 1).

    ## Version history

    Each id is one YAML in ``refit_gym/configs/`` (``refit-gym info ID`` names it); its
    ``env.versions`` list is the id's history, shown per id in ``docs/environment.md``.

    Raises:
        ConfigError: an unknown keyword argument or a value out of range (also a ``ValueError``).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self, scenario: str = "ReFiT-Synthetic-v0", render_mode: Optional[str] = None, render_top_k: int = 10, **kwargs: Any
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            modes = self.metadata["render_modes"]
            raise ConfigError(f"render_mode must be None or one of {modes}, got {render_mode!r}")
        if isinstance(render_top_k, bool) or not isinstance(render_top_k, int) or render_top_k < 1:
            raise ConfigError(f"render_top_k must be a positive integer, got {render_top_k!r}")
        parts = build_env_parts(scenario, batch_size=1, **kwargs)
        self.core = parts.core
        self.data = parts.data
        self.scenario, self.parts = parts.scenario, parts
        self.render_mode = render_mode
        self.render_top_k = render_top_k
        self.observation_space = single_observation_space(self.core)
        self.action_space = single_action_space(self.core)

    @property
    def base_model(self):
        """The frozen base diffusion recommender (copy its ``denoiser`` to fine-tune it)."""
        return self.core.model

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        """Start a new episode; ``options={"users": u}`` picks the user (default: uniform draw)."""
        super().reset(seed=seed)
        options = options_value(options, ("users",))
        observation = self.core.reset(self.np_random, users=options.get("users"))
        return observation_to_numpy(observation, row=0), {}

    def step(self, action):
        result = self.core.step(action, batch_shape=())
        info: dict[str, Any] = {}
        terminated = bool(result.terminated[0])
        if result.components:
            info["reward_terms"] = {name: float(value[0]) for name, value in result.components.items()
                                    if terminated or name == "shaping"}
        if terminated and result.slates is not None:
            info["slate"] = result.slates[0].cpu().numpy().astype(np.int64)
            info["slate_log_prob"] = float(result.slate_log_prob[0])
        return observation_to_numpy(result.observation, row=0), float(result.reward[0]), terminated, False, info

    def render(self) -> Optional[str]:
        if self.render_mode is None:
            gym.logger.warn("render() was called without a render_mode; pass render_mode='ansi' to make()")
            return None
        if not self.core.ready:
            return f"{self.parts.name}: not reset yet\n"
        return render_rows(self.core, [0], self.parts.item_titles, self.render_top_k, self.parts.name)[0]
