"""Lightning callbacks of fff_lightning.

This top-level folder is installed as the ``fff_lightning.callbacks`` package (see ``pyproject.toml``), so a
config addresses a callback as ``class_path: fff_lightning.callbacks.<Name>``.
"""

__all__: list[str] = []
