"""Helpers of the tests that train: a tiny tree and flags, subprocess runs, checkpoint files.

Shared by main_test.py, train_test.py, soak_test.py and multi_worker_test.py.
"""

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import flags

from flags import uda_flags
from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny UDA run: U-Net depth 2 with 8 filters, 64x128 crops, 6 steps.
TINY_FLAGS = (
    "--model_name=unet",
    "--unet_depth=2",
    "--unet_filters=8",
    "--crop_height=64",
    "--crop_width=128",
    "--train_batch_size=2",
    "--sup_size=4",
    "--dev_size=2",
    "--unsup_ratio=1",
    "--uda_confidence_thresh=0.1",
    "--uda_softmax_temp=0.9",
    "--train_steps=6",
    "--save_steps=3",
    "--iterations=3",
    "--eval_batch_size=2",
    "--moving_average_decay=0.9",
    "--num_vis_images=2",
    "--max_save=1",
    "--do_eval",
)


def tiny_argv(data_dir: str, model_dir: str, *extra: str) -> list[str]:
    """Command-line flags of the tiny run on `data_dir`; `extra` flags override."""
    return [f"--data_dir={data_dir}", f"--model_dir={model_dir}", *TINY_FLAGS, *extra]


def parse_config(argv: Sequence[str]) -> config_lib.Config:
    """The Config that `python -m uda_tf.main *argv` would run."""
    flag_values = flags.FlagValues()
    uda_flags.define_flags(flag_values)
    flag_values(["uda_tf.main", *argv])
    return uda_flags.config_from_flags(flag_values)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def temp_dir(test: tf.test.TestCase) -> str:
    """A temporary directory removed when the test ends."""
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def make_tree(data_dir: str | None = None) -> str:
    """A generated Cityscapes tree: 6 train, 3 val, 4 extra images of 64x128."""
    data_dir = data_dir or tempfile.mkdtemp()
    fake_cityscapes.generate(
        data_dir, num_train=6, num_val=3, num_extra=4, height=64, width=128, seed=0
    )
    return data_dir


def main_command(argv: Sequence[str], module: str = "uda_tf.main") -> list[str]:
    """The command line of `python -m <module> *argv`."""
    return [sys.executable, "-m", module, *argv]


def subprocess_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def start(command: Sequence[str], log_path: str, **env: str) -> subprocess.Popen:
    """Starts `command` in the repository (`env` added), stdout and stderr to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(**env), stdout=log, stderr=log
        )


def run(command: Sequence[str]) -> subprocess.CompletedProcess:
    """Runs `command` in the repository to its end, capturing its output."""
    return subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, check=False
    )


def log_tail(log_path: str, size: int = 3000) -> str:
    with open(log_path) as f:
        return f.read()[-size:]


def kill(process: subprocess.Popen) -> None:
    """SIGKILL (no clean-up runs), then reap."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


def wait_until(
    condition: Callable[[], bool],
    process: subprocess.Popen,
    log_path: str,
    *,
    timeout: float = 300,
    poll: float = 0.2,
) -> bool:
    """Polls `condition` while `process` runs; False if it ended or timed out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(poll)
    return False


def checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint at `path` (a prefix), by its key."""
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def file_digests(directory: str, prefix: str = "ckpt-") -> dict[str, str]:
    """SHA-256 of the files of `directory` whose names start with `prefix`."""
    digests = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(prefix) and os.path.isfile(path):
            with open(path, "rb") as f:
                digests[name] = hashlib.sha256(f.read()).hexdigest()
    return digests
