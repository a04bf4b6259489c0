"""Configuration: a typed schema, YAML loading with inheritance, ``key=value`` overrides and validation.

Every number of the method lives here or in ``configs/*.yaml`` (docs/method.md, decision 1); the code reads
it from the object that :func:`load_config` returns. The package has one module per idea:

- :mod:`~senseflow.config.schema`: the dataclasses of the training config (OmegaConf structured configs) whose
  sections are ``experiment``, ``teacher``, ``schedule``, ``method``, ``discriminator``, ``optimizer``, ``train``,
  ``data`` and ``dist``, with each field's allowed choices (``teacher.family``: the registered teacher families);
- :mod:`~senseflow.config.introspection`: keys, types and choices of a schema (:func:`schema_keys`);
- :mod:`~senseflow.config.loading`: YAML ``defaults`` chains, overrides, unknown-key hints, type errors
  (:func:`load_structured`, :func:`load_config`);
- :mod:`~senseflow.config.validation`: value ranges, choices and cross-key rules (:func:`validate`), and
  :func:`validate_paths`;
- :mod:`~senseflow.config.output`: :func:`resolved_yaml`, :func:`save_resolved`;
- :mod:`~senseflow.config.cli`: the ``senseflow config`` command (:func:`main_config_check`).

Every failure is a :class:`ConfigError` with a one-line message naming the key and the file. Paths are checked
separately by :func:`validate_paths`, so a config can be inspected (``--dry-run``, ``senseflow config``) on a
machine without the models; trainers call it before any model loads.

The returned object is a plain :class:`SenseFlowConfig` dataclass (nested dataclasses, plain lists), e.g.
``cfg.method.isg.weight`` is λ_ISG; a timestep section converts to the method's sampler with
``TimestepSampler(**dataclasses.asdict(cfg.method.dmd.timestep))``.
"""
from __future__ import annotations

from senseflow.config.cli import main_config_check
from senseflow.config.errors import ConfigError
from senseflow.config.introspection import schema_keys
from senseflow.config.loading import load_config, load_structured
from senseflow.config.output import resolved_yaml, save_resolved
from senseflow.config.schema import (
    DataConfig,
    DiscriminatorConfig,
    DistConfig,
    DMD2ClsConfig,
    DMDConfig,
    EMAConfig,
    ExperimentConfig,
    FakeConfig,
    GANConfig,
    GuidanceConfig,
    IDAConfig,
    ISGConfig,
    MethodConfig,
    OptimizerConfig,
    ScheduleConfig,
    SenseFlowConfig,
    TeacherConfig,
    TimestepSamplerConfig,
    TrainConfig,
)
from senseflow.config.validation import validate, validate_paths

__all__ = [
    "ConfigError",
    "SenseFlowConfig",
    "ExperimentConfig",
    "TeacherConfig",
    "ScheduleConfig",
    "TimestepSamplerConfig",
    "GuidanceConfig",
    "DMDConfig",
    "FakeConfig",
    "IDAConfig",
    "ISGConfig",
    "GANConfig",
    "DMD2ClsConfig",
    "MethodConfig",
    "DiscriminatorConfig",
    "OptimizerConfig",
    "EMAConfig",
    "TrainConfig",
    "DataConfig",
    "DistConfig",
    "load_config",
    "load_structured",
    "validate",
    "validate_paths",
    "resolved_yaml",
    "save_resolved",
    "schema_keys",
    "main_config_check",
]
