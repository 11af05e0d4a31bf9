"""Nothing the package loads can run code (issue 16, item 4): a scan of its source for every call that can
unpickle or evaluate, each of which must be one of the reviewed safe forms.

- ``torch.load`` only with ``weights_only=True`` (checkpoints are safetensors; this is the fallback rule);
- ``pickle.load(s)`` / ``Unpickler`` only in ``attacks/safe_load.py``, the restricted reader of published poison
  pickles (tests/config/test_cli.py feeds it a payload that would run a shell command);
- ``np.load`` only with ``allow_pickle=False``;
- ``yaml.load`` only with the package's SafeLoader subclass; no ``eval``/``exec``/``marshal``/``shelve``/``dill``.
The hostile-input tests prove the readers refuse; this scan keeps new code from adding an unreviewed one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "puregen_dist"
PICKLE_READER = PACKAGE / "attacks" / "safe_load.py"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(value, expected) -> bool:
    return isinstance(value, ast.Constant) and value.value is expected


def unsafe_calls(path: Path) -> list[str]:
    """Every call in ``path`` that could execute code from data, as ``file:line: what``."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, owner, name in _calls(tree):
        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        if owner == "torch" and name == "load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        if owner in ("pickle", "cPickle", "_pickle") and name in ("load", "loads", "Unpickler") \
                and path != PICKLE_READER:
            found.append(f"{where}: pickle.{name} outside the restricted reader")
        if owner in ("np", "numpy") and name == "load" and not _is_const(_keyword(node, "allow_pickle"), False):
            found.append(f"{where}: np.load without allow_pickle=False")
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
            loader = _keyword(node, "Loader")
            if not (isinstance(loader, ast.Name) and loader.id == "_StrictLoader"):
                found.append(f"{where}: yaml.{name} with a loader that may build objects")
        if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where}: {name}()")
        if owner in ("marshal", "shelve", "dill", "joblib", "cloudpickle") and name in ("load", "loads", "open"):
            found.append(f"{where}: {owner}.{name}")
    return found


def test_the_scan_finds_each_unsafe_form(tmp_path):
    probe = PACKAGE / "_probe_unsafe.py"  # inside the package, so relative names resolve
    probe.write_text("import pickle, torch, numpy as np, yaml\n"
                     "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\npickle.loads(b'')\n"
                     "np.load('a.npy')\nyaml.load('a: 1', Loader=yaml.Loader)\neval('1')\n")
    try:
        assert len(unsafe_calls(probe)) == 6
    finally:
        probe.unlink()


def test_the_package_never_loads_data_that_can_run_code():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in unsafe_calls(path)]
    assert not found, "\n".join(found)


def test_the_strict_yaml_loader_is_a_safe_loader():
    import yaml

    from puregen_dist.config import loading

    assert issubclass(loading._StrictLoader, yaml.SafeLoader)
