"""Loading published poison files without running code from them.

``.npy`` files are read with ``allow_pickle=False``. Pickles (the poisoning-benchmark layout) go through
:class:`RestrictedUnpickler`, whose ``find_class`` resolves only the globals that pickled arrays, numpy
scalars and PIL images reference; any other global (``os.system``, ``builtins.eval``, a class with a
``__reduce__`` payload) is refused before it is called, so a hostile file stops at the first such reference.
Lists, tuples, dicts, ints, floats, strings and bytes need no global and load natively.

Images leave this module as (H, W, C) uint8 arrays in the dataset's layout (see :func:`as_uint8_image`).
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from puregen_dist.config.errors import UserInputError

ACCEPTED = "only arrays, images, numbers, strings, lists and tuples are accepted"

_NUMPY_CORE = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
"""(submodule, name) under ``numpy.core`` (numpy 1) or ``numpy._core`` (numpy 2): array and scalar rebuilding."""
_BUILTINS = {"object", "complex", "bytearray", "set", "frozenset", "slice"}
"""Harmless builtins that protocols 0-3 reference by name (``object`` by copyreg's ``_reconstructor``)."""
_PIL_PLUGIN = re.compile(r"PIL\.[A-Za-z0-9]+ImagePlugin")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only array, numpy-scalar and PIL-image globals (module docstring).

    ``label`` names the file in errors. Names of Python 2 pickles (``copy_reg``, ``__builtin__``) are
    accepted for the same objects.
    """

    def __init__(self, file: Any, label: str) -> None:
        super().__init__(file)
        self.label = label

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise UserInputError(f"{self.label}: refuses to load {module}.{name}: {ACCEPTED}")
        return found


def _allowed_global(module: str, name: str) -> Any:
    """The object of an allowed ``module.name``, else None (never imports outside numpy and PIL)."""
    parts = module.split(".")
    if parts[0] == "numpy" and len(parts) == 3 and parts[1] in ("core", "_core") \
            and (parts[2], name) in _NUMPY_CORE:
        return getattr(_numpy_core(parts[2]), name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return getattr(builtins, name)
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
        return _object_reconstructor
    if module == "_codecs" and name == "encode":  # how protocols 0-2 store bytes
        return codecs.encode
    is_plugin = _PIL_PLUGIN.fullmatch(module) is not None and name.endswith("ImageFile")
    if (module == "PIL.Image" and name == "Image") or is_plugin:
        return _pil_class(module, name)
    return None


def _object_reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to ``base is object`` (how protocols 0-1 pickle plain instances):
    any other base would run ``base.__init__(obj, state)``, e.g. a PIL plugin opening a path named by the file."""
    if base is not object or state is not None:
        raise UserInputError(f"refuses to rebuild {cls.__name__} through {getattr(base, '__name__', base)}: "
                             f"{ACCEPTED}")
    return object.__new__(cls)


def _numpy_core(submodule: str) -> Any:
    """``numpy._core.<submodule>`` (numpy 2), else ``numpy.core.<submodule>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


def _pil_class(module: str, name: str) -> type | None:
    """``PIL.Image.Image`` for PIL's ``Image`` class or one of its ImageFile plugin subclasses (an image opened
    from a file pickles as its plugin class), else None. Always the plain class: it is rebuilt from its pickled
    pixels by ``__setstate__`` alone, never by a plugin's constructor (which opens and decodes a file)."""
    from PIL import Image

    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return Image.Image if isinstance(found, type) and issubclass(found, Image.Image) else None


def load_pickle(path: Path, key: str) -> Any:
    """The object pickled in ``path`` through :class:`RestrictedUnpickler`; ``key`` (the config field)
    prefixes errors. Raises UserInputError for a refused global or an unreadable file."""
    label = f"{key}: {path}"
    try:
        with path.open("rb") as handle:
            return RestrictedUnpickler(handle, label).load()
    except UserInputError as exc:
        message = str(exc)
        raise UserInputError(message if message.startswith(label) else f"{label}: {message}") from None
    except Exception as exc:  # a malformed pickle can raise almost anything while being rebuilt
        raise UserInputError(f"{label}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_npy(path: Path, key: str) -> np.ndarray:
    """The array in ``path`` (memory-mapped, read-only; ``allow_pickle=False``): a plain numeric .npy file."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise UserInputError(f"{key}: {path}: not a numeric .npy array without pickled objects ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise UserInputError(f"{key}: {path}: expected a single .npy array, got an .npz archive")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise UserInputError(f"{key}: {path}: expected a numeric array, got dtype {array.dtype}")
    return array


def require_file(path: str, key: str, *, directory: bool = False) -> Path:
    """``path`` as a Path; UserInputError naming ``key`` when it is not an existing file (or directory)."""
    found = Path(path).expanduser()
    if not (found.is_dir() if directory else found.is_file()):
        raise UserInputError(f"{key}: {'directory' if directory else 'file'} not found: {path}")
    return found


def is_image(obj: Any) -> bool:
    """Whether ``obj`` is a PIL image or a numpy array (what image entries of the pickles hold)."""
    return isinstance(obj, np.ndarray) or type(obj).__module__.startswith("PIL.")


def as_uint8_image(obj: Any, shape: tuple[int, int, int], what: str) -> np.ndarray:
    """One image as (H, W, C) uint8 matching the dataset's ``shape``.

    Accepts a PIL image (mode ``L`` for C = 1, ``RGB`` for C = 3), or an array of shape (H, W, C),
    (C, H, W) or (H, W) (C = 1): uint8, or float in [0, 1] pixel units (rounded to the nearest of 256 levels).
    ``what`` names the image in errors.
    """
    h, w, c = shape
    if type(obj).__module__.startswith("PIL."):
        want = {1: "L", 3: "RGB"}.get(c)
        if obj.mode != want:
            raise UserInputError(f"{what}: PIL image of mode {obj.mode!r}; the dataset's {c}-channel images "
                                 f"need mode {want!r}")
        obj = np.asarray(obj)
    if not isinstance(obj, np.ndarray):
        raise UserInputError(f"{what}: expected an image (PIL or array), got {type(obj).__name__}")
    array = obj[..., None] if obj.shape == (h, w) and c == 1 else obj
    if array.shape == (c, h, w) and array.shape != (h, w, c):
        array = array.transpose(1, 2, 0)
    if array.shape != (h, w, c):
        raise UserInputError(f"{what}: image of shape {tuple(obj.shape)} does not match the dataset's "
                             f"(H, W, C) = {shape}")
    return to_uint8(array, what)


def to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 as it is; float in [0, 1] (1e-3 slack) rounded to uint8; anything else is an error."""
    if array.dtype == np.uint8:
        return np.array(array, dtype=np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(f"{what}: expected uint8 or float pixels in [0, 1], got dtype {array.dtype}")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise UserInputError(f"{what}: float pixels must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return np.clip(np.rint(np.asarray(array, np.float64) * 255.0), 0, 255).astype(np.uint8)
