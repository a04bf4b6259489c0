#!/usr/bin/env python
"""Generate images with a DMD2-SDXL student (docs/method.md §16); all logic lives in :mod:`senseflow.inference`.

Example::

    python scripts_sdxl/test_sdxl_dmd2.py \
        --sdxl_ckpt /path/to/stable-diffusion-xl-base-1.0 \
        --checkpoint /path/to/checkpoint.pth \
        --output_dir ./outputs

Run with ``--help`` for every option (prompts file and range, batch size, sampler, steps, seed, size, device).
"""
import sys

from senseflow.inference import main

if __name__ == "__main__":
    sys.exit(main(spec="sdxl-dmd2"))
