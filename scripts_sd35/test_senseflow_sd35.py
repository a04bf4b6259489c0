#!/usr/bin/env python
"""Generate images with a SenseFlow-SD3.5-Medium student (docs/method.md §16); logic: :mod:`senseflow.inference`.

Example::

    python scripts_sd35/test_senseflow_sd35.py \
        --sd35_ckpt /path/to/stable-diffusion-3.5-medium \
        --checkpoint /path/to/checkpoint.pth \
        --output_dir ./outputs

Run with ``--help`` for every option (prompts file and range, batch size, sampler, steps, seed, size, device).
"""
import sys

from senseflow.inference import main

if __name__ == "__main__":
    sys.exit(main(spec="sd35-medium"))
