#!/usr/bin/env bash
# Session 20, call 5: bench/gpu_s20_c4.sh with two micro-batches of 8 per rank and step (see there).
MICRO=8 NAME=c5 WITH_TEST=0 exec bash bench/gpu_s20_c4.sh
