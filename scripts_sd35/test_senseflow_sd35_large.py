#!/usr/bin/env python
"""Generate images with a SenseFlow-SD3.5-Large student (docs/method.md §16); logic: :mod:`senseflow.inference`.

Example::

    python scripts_sd35/test_senseflow_sd35_large.py \
        --sd35_ckpt /path/to/stable-diffusion-3.5-large \
        --checkpoint /path/to/checkpoint.pth \
        --output_dir ./outputs

Run with ``--help`` for every option (prompts file and range, batch size, sampler, steps, seed, size, device).
"""
import sys

from senseflow.inference import main

if __name__ == "__main__":
    sys.exit(main(spec="sd35-large"))
