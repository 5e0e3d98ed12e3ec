"""What a run's data is, as the rest of the run reads it: :class:`DataPlan`.

The data module makes it (:meth:`~fff_lightning.data.datamodule.FFFDataModule.plan`): from its config alone before
anything is read (the largest step the config allows), and with the prepared data's facts once it is set up (the
validation sets, the training steps of an epoch, the largest step). The module, the memory planner and
``budget --memory`` read this, never the data module's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataPlan:
    """The data facts a run is planned and checked on (read-only).

    Attributes:
        packing: whether samples are packed into rows (``data.packing``).
        worst_step_tokens: the largest step the data config allows, before any data is read: rows x
            ``max_seq_length`` (padded) or ``tokens_per_batch`` (packed).
        prepared: whether the data is prepared (the fields below are its facts; before, they are empty).
        val_names: the validation sets, in their loaders' order.
        steps_per_epoch: training batches of an epoch (of this process).
        largest_step_tokens: tokens of the largest training step of the prepared data (padded: rows x the longest
            row of the batch; packed: the row's tokens), ``None`` where there are no training batches.
    """

    packing: bool
    worst_step_tokens: int
    prepared: bool = False
    val_names: tuple[str, ...] = ()
    steps_per_epoch: int = 0
    largest_step_tokens: int | None = None

    @property
    def step_tokens(self) -> int:
        """The step the memory plan is made for: the prepared data's largest, else the config's worst."""
        return self.largest_step_tokens or self.worst_step_tokens
