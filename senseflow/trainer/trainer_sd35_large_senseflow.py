"""SenseFlow on SD3.5 Large (flow matching, shift 3, GD 5, IDA λ 0.97): configs/SD35/sd35_large_senseflow.yaml."""
from senseflow.trainer.base import DistillationTrainer


class SD35LargeSenseFlowTrainer(DistillationTrainer):
    """SenseFlow on SD3.5 Large (flow matching, shift 3, GD 5, IDA λ 0.97): configs/SD35/sd35_large_senseflow.yaml."""

    family_name = "sd3"
    method_name = "senseflow"
