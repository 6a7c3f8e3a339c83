"""refit-gym: the denoising chain of a diffusion recommender as a Gymnasium environment."""

from refit_gym.errors import RefitGymError

__version__ = "0.1.0"

from refit_gym.envs import (  # noqa: E402
    list_envs,
    make_sb3_vec_env,
    make_torchrl_env,
    register_envs,
    register_scenario,
)

register_envs()  # idempotent: every scenario shipped in refit_gym/configs (also via gym.make("refit_gym:<id>"))

__all__ = ["RefitGymError", "__version__", "list_envs", "make_sb3_vec_env", "make_torchrl_env", "register_envs",
           "register_scenario"]
