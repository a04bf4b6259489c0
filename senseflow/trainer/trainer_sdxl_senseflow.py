"""SenseFlow on SDXL (DDPM ε-prediction; no IDA in the preset, ISG and VFM GAN on): configs/sdxl/sdxl_senseflow.yaml."""
from senseflow.trainer.base import DistillationTrainer


class SDXLSenseFlowTrainer(DistillationTrainer):
    """SenseFlow on SDXL (DDPM ε-prediction; no IDA in the preset, ISG and VFM GAN on):
    configs/sdxl/sdxl_senseflow.yaml."""

    family_name = "sdxl"
    method_name = "senseflow"
