"""The core layer's one-of-each helpers (senseflow/core) and the registries built on them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from senseflow.core.argparsing import RaisingParser
from senseflow.core.dtypes import CLI_DTYPES, DTYPE_NAMES, parse_dtype
from senseflow.core.io import atomic_write, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write_text(target, "new", fsync=True)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["state.json"]

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["state.json"]


def test_one_dtype_table_for_configs_and_command_lines() -> None:
    assert DTYPE_NAMES == ("float32", "bfloat16", "float16")
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    assert CLI_DTYPES["auto"] is None and CLI_DTYPES["fp32"] is torch.float32
    with pytest.raises(ValueError, match=r"teacher.dtype: 'int8' is not one of float32, fp32, bfloat16, bf16"):
        parse_dtype("int8", "teacher.dtype")
    with pytest.raises(ValueError, match="not one of float32, bfloat16, float16$"):
        parse_dtype("bf16", "x", names=DTYPE_NAMES)


def test_the_raising_parser_raises_its_error_type() -> None:
    class Refused(Exception):
        pass

    class Parser(RaisingParser):
        error_type = Refused

    p = Parser(prog="x")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(Refused, match="--n"):
        p.parse_args([])


def test_one_sampler_registry_for_inference_and_evaluation() -> None:
    from senseflow import inference
    from senseflow.method.sampling import SAMPLERS, get_sampler, sample_euler, sample_stochastic

    assert SAMPLERS == {"stochastic": sample_stochastic, "euler": sample_euler}
    assert inference.SAMPLERS == ("stochastic", "euler")
    with pytest.raises(ValueError, match="expected one of: stochastic, euler"):
        get_sampler("heun")


def test_trainers_are_found_by_module_name() -> None:
    from senseflow.trainer import TRAINERS, get_trainer
    from senseflow.trainer.base import DistillationTrainer

    assert sorted(TRAINERS) == ["flux_senseflow", "sd35_large_senseflow", "sd35_senseflow", "sdxl_dmd2",
                                "sdxl_senseflow"]
    for name in TRAINERS:
        cls = get_trainer(name)
        assert issubclass(cls, DistillationTrainer) and cls.__module__ == TRAINERS[name]
    assert get_trainer("sdxl_dmd2").method_name == "dmd2"
    with pytest.raises(ValueError, match="unknown trainer"):
        get_trainer("sdxl")
