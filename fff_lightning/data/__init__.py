"""Data: the four datasets of the FFF study, formatted, mixed reproducibly, validated per dataset.

``fff_lightning.data.datamodule.FFFDataModule`` is the LightningDataModule; ``samples/`` holds the bundled
sample files (``bundled:<name>`` in a source's ``path``).
"""
