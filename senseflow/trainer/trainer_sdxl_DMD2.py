"""The DMD2 baseline on SDXL as official DMD2 runs it (docs/method.md §11.1): classifier on the fake UNet bottleneck."""
from senseflow.trainer.base import DistillationTrainer


class SDXLDMD2Trainer(DistillationTrainer):
    """The DMD2 baseline on SDXL as official DMD2 runs it (docs/method.md §11.1): classifier head on the fake UNet
    bottleneck."""

    family_name = "sdxl"
    method_name = "dmd2"
