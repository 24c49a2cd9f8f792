"""Check that data-parallel replicas hold identical weights (DDP must never let them drift)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class ReplicaConsistency(Callback):
    """At the end of ``fit``, gathers every rank's parameters and logs the largest difference.

    Writes ``replicas.json`` (world size, max |w_rank - w_0|) into the trainer's log dir on rank 0.

    Args:
        raise_on_mismatch: raise if the replicas differ by more than ``atol``.
        atol: tolerated absolute difference.
    """

    def __init__(self, raise_on_mismatch: bool = False, atol: float = 0.0) -> None:
        self.raise_on_mismatch = raise_on_mismatch
        self.atol = atol

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)  # [world, P] (just [P] on one device)
        gathered = gathered.view(trainer.world_size, -1)
        diff = float((gathered - gathered[0]).abs().max())
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank must ask
        if trainer.is_global_zero:
            out = Path(log_dir) / "replicas.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"world_size": trainer.world_size, "max_abs_diff": diff,
                                       "num_params": int(flat.numel())}))
            log.info("replica check: world size %d, max |w_r - w_0| = %.3g", trainer.world_size, diff)
        if self.raise_on_mismatch and diff > self.atol:
            raise RuntimeError(f"DDP replicas diverged: max |w_r - w_0| = {diff:.3g} > {self.atol}")
