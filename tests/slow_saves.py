"""`python -m tests.slow_saves <flags>`: uda_tf.main, pausing inside every checkpoint save.

For soak_test.py, which SIGKILLs it at chosen moments. Before each step TF
takes to publish a checkpoint it appends a line "<kind> <path>" to the file
$UDA_SAVE_MARKS, then sleeps $UDA_SAVE_PAUSE seconds:

  merge   the tensors are written in ckpt-<step>_temp/; next they are moved
          into ckpt-<step>.data-* and the index is written
  state   ckpt-<step> is complete; next the state file names it (once before
          deleting old checkpoints, once after)
  delete  next, one file of an old checkpoint (.index, then .data-*) is deleted
"""

import os
import time

import tensorflow as tf
from absl import app
from tensorflow.python.checkpoint import checkpoint_management
from tensorflow.python.ops import gen_io_ops

from flags import uda_flags
from uda_tf import main


def _mark(kind: str, path) -> None:
    if tf.is_tensor(path):
        path = path.numpy().decode()
    with open(os.environ["UDA_SAVE_MARKS"], "a") as f:
        f.write(f"{kind} {path}\n")
    time.sleep(float(os.environ.get("UDA_SAVE_PAUSE", "0")))


def _install() -> None:
    merge = gen_io_ops.merge_v2_checkpoints
    record = checkpoint_management.update_checkpoint_state_internal
    delete = checkpoint_management._delete_file_if_exists

    def merge_v2_checkpoints(checkpoint_prefixes, destination_prefix, *args, **kwargs):
        _mark("merge", destination_prefix)
        return merge(checkpoint_prefixes, destination_prefix, *args, **kwargs)

    def update_checkpoint_state_internal(save_dir, model_checkpoint_path, *args, **kwargs):
        _mark("state", model_checkpoint_path)
        return record(save_dir, model_checkpoint_path, *args, **kwargs)

    def delete_file_if_exists(filespec):
        _mark("delete", filespec)
        return delete(filespec)

    gen_io_ops.merge_v2_checkpoints = merge_v2_checkpoints
    checkpoint_management.update_checkpoint_state_internal = update_checkpoint_state_internal
    checkpoint_management._delete_file_if_exists = delete_file_if_exists


if __name__ == "__main__":
    _install()
    uda_flags.define_flags()
    app.run(main.main)
