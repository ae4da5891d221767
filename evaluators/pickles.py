"""Pickled files of released data sets read without running anything they name.

Why: CIFAR's python batches and revisited Oxford/Paris' ground truth ship as pickles, and an
ordinary unpickler calls whatever class or function a file names (a crafted file could run any
code). These are read by an unpickler that builds builtin containers, strings and numbers and,
of the classes, numpy's arrays, scalars and dtypes only (the releases' own content; and the str
to bytes encoding through which protocol 2 writes an array's buffer), refusing any other with an
error naming it.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                     ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                     ("numpy", "ndarray"), ("numpy", "dtype"),
                     # protocol 2's bytes (a str encoded, or an empty one made): an array's buffer
                     ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")})


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a data set's pickle may hold only "
                                         "dicts, lists, strings, numbers and numpy arrays")
        return super().find_class(module, name)


def load_data_pickle(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` of builtin containers, scalars and numpy arrays (no other class, no
    function). ``encoding``: how Python 2's strings decode (``"bytes"`` keeps them bytes, as
    CIFAR's keys are read; latin-1, the default, is what numpy needs for arrays pickled by Python 2)."""
    return _DataOnly(io.BytesIO(data), encoding=encoding).load()
