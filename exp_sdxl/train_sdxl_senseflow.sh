#!/bin/sh
# usage: sh exp_sdxl/train_sdxl_senseflow.sh NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]   (see README "Training")
exec sh "$(dirname "$0")/../tools/launch.sh" sdxl_senseflow "$@"
