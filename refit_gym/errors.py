"""The exceptions of refit-gym.

Every error the library raises on purpose derives from :class:`RefitGymError`, so a caller can
catch the library's failures with one ``except``. Errors about a bad *value* (a bad action, an
unknown option, a weight out of range) also derive from :class:`ValueError`, which is what
Gymnasium users expect.
"""

from __future__ import annotations


class RefitGymError(Exception):
    """Base class of every error raised by refit-gym."""


class DataError(RefitGymError, ValueError):
    """A data file or data directory is missing, malformed or inconsistent.

    The message names the file and the problem.
    """


class ConfigError(RefitGymError, ValueError):
    """A configuration value or keyword argument is unknown or out of range."""


class ActionError(RefitGymError, ValueError):
    """An action has the wrong shape, dtype, or holds NaN / inf."""


class RewardError(RefitGymError, ValueError):
    """A reward term returned NaN or an infinite value (the message names the term and the user)."""


class EpisodeStateError(RefitGymError, RuntimeError):
    """The environment was used out of order (e.g. stepped after its episode ended)."""


class CheckpointError(RefitGymError, ValueError):
    """A checkpoint directory is missing files or does not match the model it is loaded into."""


class TrainingError(RefitGymError, RuntimeError):
    """Training cannot go on (a NaN or infinite loss); the message says where the last good
    checkpoint is."""


class DownloadError(RefitGymError, RuntimeError):
    """A dataset could not be downloaded or failed its checksum."""


class NotFittedError(RefitGymError, AttributeError):
    """A model was used before ``fit``. Also an ``AttributeError``, so that
    ``isinstance(unfitted_model, Recommender)`` is False instead of raising."""
