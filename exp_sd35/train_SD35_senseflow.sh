#!/bin/sh
# usage: sh exp_sd35/train_SD35_senseflow.sh NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]   (see README "Training")
exec sh "$(dirname "$0")/../tools/launch.sh" sd35_senseflow "$@"
