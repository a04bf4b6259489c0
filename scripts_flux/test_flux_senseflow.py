#!/usr/bin/env python
"""Generate images with a SenseFlow-FLUX.1-dev student (docs/method.md §16); all logic is in :mod:`senseflow.inference`.

Example::

    python scripts_flux/test_flux_senseflow.py \
        --flux_ckpt /path/to/FLUX.1-dev \
        --checkpoint /path/to/checkpoint.pth \
        --output_dir ./outputs

Run with ``--help`` for every option (prompts file and range, batch size, sampler, steps, seed, size, device).
"""
import sys

from senseflow.inference import main

if __name__ == "__main__":
    sys.exit(main(spec="flux"))
