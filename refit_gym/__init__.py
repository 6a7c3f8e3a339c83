"""refit-gym: the denoising chain of a diffusion recommender as a Gymnasium environment."""

from refit_gym.errors import RefitGymError

__version__ = "0.1.0"

__all__ = ["RefitGymError", "__version__"]
