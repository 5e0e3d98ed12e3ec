"""fff_lightning: train FFF adapters (gated MLP sub-layers on an MLP projection's input) and LoRA on Mistral.

Importing the package is cheap; the heavy libraries load only in the modules that need them. The top-level
``callbacks/`` and ``configs/`` folders are installed as ``fff_lightning.callbacks`` and ``fff_lightning.configs``
(``pyproject.toml`` maps them).
"""

__version__ = "0.1.0"
