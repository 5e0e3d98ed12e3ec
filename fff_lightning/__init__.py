"""fff_lightning: train FFF adapters (gated MLP sub-layers on an MLP projection's input) and LoRA on Mistral.

Importing the package is cheap; the heavy libraries load only in the modules that need them.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Installed, the top-level callbacks/ folder is the fff_lightning.callbacks package (pyproject maps it). Run from
# a source checkout (``python -m fff_lightning`` in the repository root shadows the installed copy), the same
# folder is found through the package path, so configs' ``fff_lightning.callbacks.X`` resolve either way.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "callbacks" / "__init__.py").is_file():
    __path__.append(str(_root))
