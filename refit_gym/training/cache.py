"""The pretrained-model cache: a base model for a config and a dataset, from disk, or pretrained once.

Two levels:

* on disk, :func:`pretrained_checkpoint`: ``<cache_dir>/<data>-<model>-<hash>`` where the hash
  covers everything the weights depend on (seed, model, diffusion, pretrain and evaluation
  sections, the training matrix and order, the validation split: :func:`cache_identity`); ``cache_dir`` defaults to ``$XDG_CACHE_HOME/refit_gym/checkpoints``
  (``~/.cache/refit_gym/checkpoints``);
* in the process, :func:`frozen_base_model`: one frozen model object per checkpoint, shared by
  every environment built in the process.

The pretraining code is imported only when a checkpoint is missing, so building an environment
over a cached model never loads it. Processes that miss the same entry at once (the workers of an
asynchronous vector env, parallel test workers, two notebooks) pretrain it once: the first holds a
lock file (``<cache_dir>/.locks/<entry>.lock``) while it trains, the others wait and then load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from refit_gym.config import ExperimentConfig
from refit_gym.data.interactions import InteractionData
from refit_gym.errors import ConfigError
from refit_gym.models import BaseModel, build_model

_FROZEN: dict[tuple[str, str], BaseModel] = {}
_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


def default_checkpoint_cache() -> Path:
    """``$XDG_CACHE_HOME/refit_gym/checkpoints`` (``XDG_CACHE_HOME`` if absolute, else ``~/.cache``)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "refit_gym" / "checkpoints"


def _fingerprint(matrix: sp.csr_matrix, *extra: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
    for array in (matrix.indptr, matrix.indices, *extra):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def train_fingerprint(data: InteractionData) -> str:
    """A short hash of the training matrix (shape and nonzeros) and of the training order
    (``train_sequences``, which T-DiffRec's weights and the ``recent`` hold-out read)."""
    sequences = data.train_sequences
    return _fingerprint(sp.csr_matrix(data.train), sequences.indptr, sequences.items)


def cache_identity(config: ExperimentConfig, data: InteractionData) -> dict[str, Any]:
    """Everything the pretrained weights depend on: the seed, the model, diffusion, pretrain and
    evaluation sections (the evaluation selects the checkpoint) and fingerprints of the training
    data (matrix and order) and of the validation split."""
    described = {key: config.to_dict()[key] for key in ("seed", "model", "diffusion", "pretrain", "evaluation")}
    described["train"] = train_fingerprint(data)
    described["valid"] = _fingerprint(sp.csr_matrix(data.valid))
    return described


def cache_key(config: ExperimentConfig, data: InteractionData) -> str:
    """``<data>-<model>-<hash>`` of :func:`cache_identity`."""
    digest = hashlib.sha256(json.dumps(cache_identity(config, data), sort_keys=True).encode()).hexdigest()[:12]
    name = config.model.name.replace(":", ".").replace("/", ".")
    return f"{data.name}-{name}-{digest}"


def cached_checkpoint(config: ExperimentConfig, data: InteractionData, cache_dir: Optional[str | Path] = None) -> Path:
    """Where :func:`pretrained_checkpoint` keeps ``config``'s model (it may not exist yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_checkpoint_cache()
    return root / cache_key(config, data)


def staging_folder(config: ExperimentConfig, data: InteractionData, cache_dir: Optional[str | Path] = None) -> Path:
    """Where :func:`pretrained_checkpoint` trains ``config``'s model before moving it into the cache."""
    directory = cached_checkpoint(config, data, cache_dir)
    return directory.parent / f".{directory.name}.partial"


def is_cached(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def lock_file(directory: Path) -> Path:
    """The lock a process holds while it pretrains the cache entry ``directory``."""
    return directory.parent / ".locks" / f"{directory.name}.lock"


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``path`` while the block runs, waiting (with a warning) for the process
    that holds it. The system releases the lock when its holder ends, killed or not, so a killed
    pretraining blocks no one. Where locks are missing (Windows, a file system without ``flock``)
    the block runs unlocked, with a warning on such a file system."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # a lock file another user created in a shared cache may be read-only: flock works on either
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        handle = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is pretraining this model (it holds %s); waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # e.g. ENOLCK / ENOSYS: a network file system without flock
            logger.warning("cannot lock %s (%s): pretraining without a lock; processes that miss the same "
                           "model at once may collide", path, error)
        yield
    finally:
        os.close(handle)  # releases the lock


def pretrained_checkpoint(
    config: ExperimentConfig,
    data: InteractionData,
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_miss: Optional[Callable[[bool], None]] = None,
) -> Path:
    """The checkpoint of ``config``'s base model pretrained on ``data``, from the cache or trained now.

    A checkpoint is trained in the staging folder ``.<name>.partial`` and renamed into place
    when it is done, so the cache never holds a half-trained entry. An interrupted pretraining
    (Ctrl-C, a killed process) leaves its staging folder, and the next call resumes it from its
    last evaluation instead of starting again. One process at a time trains an entry
    (:func:`lock_file`); another that misses it meanwhile waits, then loads what the first cached.

    ``on_miss(resuming)`` is called, under the lock, just before this process pretrains (e.g. to
    warn that it takes minutes); ``resuming``: an interrupted pretraining is resumed.
    """
    import shutil

    from refit_gym.training.run_folder import read_run

    directory = cached_checkpoint(config, data, cache_dir)
    if is_cached(directory):
        log(f"using the cached pretrained model {directory}")
        return directory
    from refit_gym.training.pretrain import pretrain

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"no pretrained {config.model.name} in the cache ({directory}) and this is one of several "
                          "torchrun processes: pretrain it first (`refit-gym pretrain`, data-parallel too) and pass "
                          "--pretrained DIR")
    with _exclusive(lock_file(directory)):
        if is_cached(directory):
            log(f"using the pretrained model another process cached meanwhile: {directory}")
            return directory
        staging = staging_folder(config, data, cache_dir)
        resume = read_run(staging) is not None
        if on_miss is not None:
            on_miss(resume)
        log(f"{'resuming' if resume else 'starting'} the pretraining of {config.model.name} on {data.name}: at "
            f"most {config.pretrain.max_epochs} epochs" + (f" or {config.pretrain.time_budget_s:.0f} s"
                                                            if config.pretrain.time_budget_s else "")
            + f"; cached in {directory} when done (interrupting keeps the progress in {staging.name})")
        if staging.exists() and not resume:
            shutil.rmtree(staging)
        pretrain(config, data, output_dir=staging, progress=progress, log=log, resume=resume,
                 record_config=cache_identity(config, data))
        try:
            os.replace(staging, directory)
        except OSError:
            if not is_cached(directory):
                raise ConfigError(f"{directory} exists and holds no complete checkpoint, so the model just "
                                  f"pretrained stays in {staging}: remove {directory} and move {staging} "
                                  "there") from None
            shutil.rmtree(staging, ignore_errors=True)  # cached first by a process that held no lock: keep that
    return directory


def freeze(model: BaseModel) -> BaseModel:
    """``model`` in eval mode with no trainable parameter (in place)."""
    model.eval()
    model.requires_grad_(False)
    return model


def fresh_model(config: ExperimentConfig, data: InteractionData) -> BaseModel:
    """A freshly initialised base model, seeded by the config (the global torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.model, config.diffusion, data, device="cpu")


def frozen_base_model(
    config: ExperimentConfig,
    data: InteractionData,
    checkpoint: Optional[str | os.PathLike] = None,
    pretrained: bool = True,
    load: Optional[Callable[[], BaseModel]] = None,
) -> BaseModel:
    """The frozen CPU base model of ``config`` on ``data``, shared in-process (the caller moves it).

    ``checkpoint``: a checkpoint directory; else, with ``pretrained``, the cached pretrained one
    (``load`` says how to get it when it is not in this process yet, e.g. pretraining it);
    else a freshly initialised, seeded model.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        key = ("checkpoint", f"{path}:{train_fingerprint(data)}")
        loader: Callable[[], BaseModel] = lambda: load_checkpoint(path, data, device="cpu")[0]
    elif not pretrained:
        key = ("fresh", cache_key(config, data))
        loader = lambda: fresh_model(config, data)
    else:
        key = ("pretrained", cache_key(config, data))
        loader = load or (lambda: load_checkpoint(pretrained_checkpoint(config, data), data, device="cpu")[0])
    with _LOCK:
        if key not in _FROZEN:
            _FROZEN[key] = freeze(loader())
        return _FROZEN[key]


def clear_model_cache() -> None:
    """Forget the in-process frozen models (the disk cache stays)."""
    with _LOCK:
        _FROZEN.clear()


__all__ = [
    "cache_key",
    "cached_checkpoint",
    "clear_model_cache",
    "default_checkpoint_cache",
    "fresh_model",
    "frozen_base_model",
    "lock_file",
    "pretrained_checkpoint",
    "train_fingerprint",
]
