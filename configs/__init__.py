"""The run configs shipped with fff_lightning (the quickstart, the research's steps 1 and 2, overlays).

This top-level folder is installed as the ``fff_lightning.configs`` package data (see ``pyproject.toml``), so an
installed copy reaches them by name: ``--config quickstart``, ``--config step2``, ``--config overlays/packed``;
``python -m fff_lightning configs`` lists them and ``configs --copy <folder>`` copies them out to edit.
"""
