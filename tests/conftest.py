"""Shared test fixtures: offline hub, one torch thread, tiny teachers built once per session.

* ``HF_HUB_OFFLINE=1`` (and the transformers / datasets equivalents) is set before anything imports the hub
  client, so a test that tried to reach a hub would fail instead of downloading.
* Tests run with one torch thread by default (``SENSEFLOW_TEST_THREADS`` overrides): the tiny models are far too
  small to gain from threads, and on a shared 2-core machine extra threads make them tens of times slower.
* ``tiny_teacher(kind)`` builds (once per kind and session) a tiny diffusers folder with
  :func:`senseflow.tiny.build_tiny_teacher` and returns its path; kinds: sdxl, sd35-medium, sd35-large, flux.
* ``tiny_backbones`` is ``{"dino": path, "clip": path}`` of the tiny VFM-discriminator backbones.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path
from typing import Callable

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SENSEFLOW_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_teacher("flux")`` → path of a tiny FLUX.1-dev-like folder (seed 0), built once per session."""
    from senseflow.tiny import build_tiny_teacher

    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_teacher(kind, tmp_path_factory.mktemp(f"tiny_{kind}") / "teacher", seed=0)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny DINOv2 and CLIP-text folders for the VFM discriminator (docs/method.md, decision 5)."""
    from senseflow.tiny import build_tiny_discriminator_backbones

    return build_tiny_discriminator_backbones(tmp_path_factory.mktemp("tiny_backbones") / "backbones", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: several times faster than two on a shared 2-core machine; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
