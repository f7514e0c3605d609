#!/bin/bash
# Placeholder until the training driver lands: generates the embedded demo tree.
set -e
python -m uda_tf.fake_cityscapes --output_dir=data/fake_cityscapes "$@"
