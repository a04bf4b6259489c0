"""SenseFlow on FLUX.1-dev (dynamic shift, guidance-embedding teacher, student without guidance embedder)."""
from senseflow.trainer.base import DistillationTrainer


class FluxSenseFlowTrainer(DistillationTrainer):
    """SenseFlow on FLUX.1-dev (dynamic shift, guidance-embedding teacher, student without guidance embedder)."""

    family_name = "flux"
    method_name = "senseflow"
