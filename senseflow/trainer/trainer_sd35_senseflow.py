"""SenseFlow on SD3.5 Medium (flow matching, shift 3, GD 10, IDA λ 0.98): configs/SD35/sd35_senseflow.yaml."""
from senseflow.trainer.base import DistillationTrainer


class SD35SenseFlowTrainer(DistillationTrainer):
    """SenseFlow on SD3.5 Medium (flow matching, shift 3, GD 10, IDA λ 0.98): configs/SD35/sd35_senseflow.yaml."""

    family_name = "sd3"
    method_name = "senseflow"
