"""Checkpoints a killed or full-disk run can trust: ``last.ckpt`` is the last epoch, writes are atomic.

Two defaults of the training CLI (:mod:`csdlab.cli`):

* :class:`LastEpochCheckpoint`: Lightning 2.6's ``ModelCheckpoint(monitor=..., save_top_k=1,
  save_last=True)`` rewrites ``last.ckpt`` only when a new best is saved, so ``--ckpt_path last``
  resumed a 30-epoch run from its best epoch (18), silently dropping 12 epochs. Here ``last.ckpt``
  is rewritten at every save point (every validation, or every epoch without validation).
* :class:`AtomicCheckpointIO`: Lightning writes into a file of the system temporary folder and then
  moves it; across file systems the move is a copy, and a full disk leaves a truncated
  ``best.ckpt`` behind. Here the file is written beside its target, flushed to disk, and renamed
  over it (``os.replace``): a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["AtomicCheckpointIO", "LastEpochCheckpoint"]

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the target's folder, ``fsync``, then ``os.replace``.

    A failed write (disk full, permissions, a crash) leaves the previous checkpoint untouched and
    removes the temporary file. Remote paths (``s3://`` ...) keep Lightning's fsspec writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp creates the file 0600; give it the permissions a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"could not write checkpoint {path} ({e.strerror or e}); the previous "
                                       f"file, if any, is unchanged. Free disk space or choose another "
                                       f"--checkpoint.dirpath") from e
            raise


class LastEpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the latest save point, best or not.

    Takes ``ModelCheckpoint``'s arguments; ``save_last="link"`` is refused, because Lightning then
    links ``last.ckpt`` to the best checkpoint, the very problem this class fixes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.save_last == "link":
            raise ValueError("checkpoint.save_last='link' makes last.ckpt point at the best checkpoint, so "
                             "--ckpt_path last would not resume the last epoch; use save_last: true")
        self._last_written_step = -1

    def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: Any) -> None:
        if (not self.save_last or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
                or trainer.fast_dev_run or self._last_written_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)
