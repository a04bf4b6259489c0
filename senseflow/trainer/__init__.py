"""Trainers: one shared DistillationTrainer and five thin per-teacher classes (names from the authors' README)."""
from importlib import import_module

#: trainer name (as given to ``senseflow train --trainer``) -> "module:Class"
TRAINERS = {
    "sdxl_senseflow": "senseflow.trainer.trainer_sdxl_senseflow:SDXLSenseFlowTrainer",
    "sdxl_dmd2": "senseflow.trainer.trainer_sdxl_DMD2:SDXLDMD2Trainer",
    "sd35_senseflow": "senseflow.trainer.trainer_sd35_senseflow:SD35SenseFlowTrainer",
    "sd35_large_senseflow": "senseflow.trainer.trainer_sd35_large_senseflow:SD35LargeSenseFlowTrainer",
    "flux_senseflow": "senseflow.trainer.trainer_flux_senseflow:FluxSenseFlowTrainer",
}


def get_trainer(name: str) -> type:
    """The trainer class registered under ``name``."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; expected one of {', '.join(TRAINERS)}")
    module, cls = TRAINERS[name].split(":")
    return getattr(import_module(module), cls)
