"""Lightning callbacks of fff_lightning.

This top-level folder is installed as the ``fff_lightning.callbacks`` package (see ``pyproject.toml``), so a
config addresses a callback as ``class_path: fff_lightning.callbacks.<Name>``.
"""

from .adapter_export import AdapterExport
from .budget import ParameterBudget
from .interrupt import GracefulInterrupt
from .seed import DeterministicSeed
from .throughput import ThroughputMonitor

__all__ = ["AdapterExport", "DeterministicSeed", "GracefulInterrupt", "ParameterBudget", "ThroughputMonitor"]
