"""Loading builtin-only pickles (dict / list / int / str ...) without ever importing a class.

A pickle can name any importable callable and call it while loading (``os.system`` through
``__reduce__``, for instance). Every such reference passes through
:meth:`pickle.Unpickler.find_class`; :class:`BuiltinOnlyUnpickler` refuses all of them, so
a tampered file fails with :class:`~refit_gym.errors.DataError` before anything runs.
The DiffuRec ``dataset.pkl`` files hold only builtins and load unchanged.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Union

from refit_gym.errors import DataError


class BuiltinOnlyUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class or function reference.

    Args:
        file: a binary file object positioned at the pickle.
        source_name: the file name used in error messages.
    """

    def __init__(self, file: BinaryIO, source_name: str) -> None:
        super().__init__(file)
        self.source_name = source_name

    def find_class(self, module: str, name: str) -> NoReturn:
        raise DataError(
            f"{self.source_name}: refusing to load the class or function {module}.{name}; "
            f"only builtin containers and scalars (dict, list, tuple, set, int, float, str, "
            f"bytes, bool, None) are allowed in a data pickle"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise DataError(
            f"{self.source_name}: refusing a persistent reference ({pid!r}); only builtin "
            f"values are allowed in a data pickle"
        )


def load_builtin_pickle(path: Union[str, os.PathLike]) -> Any:
    """Load a pickle that may contain only builtin values.

    Args:
        path: the ``.pkl`` file.

    Returns:
        The unpickled object (dicts, lists, ints, ...).

    Raises:
        DataError: the file is missing or unreadable, is not a valid pickle, or references a
            class or function (the message names the file and the class).
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            return BuiltinOnlyUnpickler(file, source_name=str(path)).load()
    except DataError:
        raise
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error})") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            KeyError, AttributeError, MemoryError) as error:
        raise DataError(f"{path}: not a valid pickle ({type(error).__name__}: {error})") from error
