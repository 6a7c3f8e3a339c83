"""Loading builtin-only pickles (dict / list / int / str ...) without ever importing a class.

A pickle can name any importable callable and call it while loading (``os.system`` through
``__reduce__``, for instance). Every such reference passes through
:meth:`pickle.Unpickler.find_class`; :class:`BuiltinOnlyUnpickler` refuses all of them, so
a tampered file fails with :class:`~refit_gym.errors.DataError` before anything runs.
The DiffuRec ``dataset.pkl`` files hold only builtins and load unchanged.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Union

from refit_gym.errors import DataError

_MEMO_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}


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

    The file is read whole and its opcodes are checked (:func:`check_pickle_structure`)
    before the unpickler runs, so a truncated or corrupt file fails with a message instead of
    half-building objects, and a corrupt memo index cannot make the unpickler allocate
    gigabytes (the walk costs about 0.3 s on DiffuRec's 3 MB ML-1M file).

    Args:
        path: the ``.pkl`` file.

    Returns:
        The unpickled object (dicts, lists, ints, ...).

    Raises:
        DataError: the file is missing, unreadable or empty, is truncated or not a valid
            pickle, or references a class or function (the message names the file and the
            class).
    """
    path = Path(path)
    data = _read_bytes(path)
    check_pickle_structure(path, data)
    try:
        return BuiltinOnlyUnpickler(io.BytesIO(data), source_name=str(path)).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError) as error:
        raise DataError(f"{path}: not a valid pickle ({type(error).__name__}: {error})") from error


def check_pickle_structure(path: Path, data: bytes) -> None:
    """Walk the opcodes of ``data`` without executing any, and refuse a malformed pickle.

    Refused: an empty file, an unknown opcode, an argument cut short, a pickle without its
    final STOP (a truncated file), and a memo index larger than the number of opcodes before
    it (a pickler numbers its memo entries 0, 1, 2, ...; a corrupt index of 4 billion would
    make CPython's unpickler allocate and zero 64 GB for its memo table).

    Raises:
        DataError: naming the file, the problem and its byte offset.
    """
    if not data:
        raise DataError(f"{path}: the file is empty (0 bytes); expected a pickle")
    try:
        for n_opcodes_before, (opcode, argument, position) in enumerate(pickletools.genops(data)):
            if opcode.name in _MEMO_PUT_OPCODES and argument > n_opcodes_before:
                raise DataError(
                    f"{path}: not a valid pickle (memo index {argument} of the {opcode.name} at "
                    f"byte {position} exceeds the {n_opcodes_before} opcodes before it)"
                )
    except DataError:
        raise
    except (ValueError, OverflowError) as error:
        raise DataError(f"{path}: not a valid pickle, or a truncated one ({error})") from error


def _read_bytes(path: Path) -> bytes:
    """The file's content; a missing or unreadable file raises :class:`DataError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error})") from error
