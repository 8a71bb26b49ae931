"""TensorBoard event files in the run folder (runs/<id>/tensorboard): the progress events'
loss and lr, the validation loss and the sample pictures, for `tensorboard --logdir
workspace/runs`. The Runs tab reads events.jsonl, not these."""
from __future__ import annotations

from pathlib import Path

from studio.jobs.run_folder import TENSORBOARD_DIR


class TensorBoardLog:
    """Writes only where `write` is true (the main process of a run, with
    training.tensorboard on). A run resumed after step `start_step` trains the steps after
    it again: what an interrupted run logged for them is hidden (TensorBoard's purge_step)."""

    def __init__(self, run_dir: Path, *, write: bool, start_step: int):
        self._writer = None
        if write:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)

    def scalars(self, step: int, **values: float) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def image(self, tag: str, image, step: int) -> None:
        """A PIL picture."""
        if self._writer is not None:
            import numpy as np

            self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
