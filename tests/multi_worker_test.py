"""Two worker processes under MultiWorkerMirroredStrategy train like one process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from tests.main_test import REPO, _argv, _config, _make_tree, _read_csv, _temp_dir
from uda_tf import main

STEPS = ("--train_steps=3", "--save_steps=1", "--iterations=1")
COMMON = ("--num_vis_images=0", "--do_eval=false", *STEPS)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
class MultiWorkerTest(tf.test.TestCase):
    def test_two_workers_reach_the_losses_of_one_process(self):
        data_dir = _make_tree(_temp_dir(self))
        tmp = _temp_dir(self)
        # Two workers, one CPU replica each, global labeled batch 2.
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
        worker_dir = os.path.join(tmp, "workers")
        command = [
            sys.executable,
            "-m",
            "uda_tf.main",
            *_argv(data_dir, worker_dir, "--strategy=multi_worker", *COMMON),
        ]
        processes = []
        for index in range(2):
            env = dict(
                os.environ,
                TF_CPP_MIN_LOG_LEVEL="2",
                TF_CONFIG=json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            )
            with open(os.path.join(tmp, f"worker{index}.log"), "w") as log:
                processes.append(
                    subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
                )
        try:
            # A worker that fails leaves the other waiting in a collective: poll both.
            deadline = time.time() + 480
            while any(p.poll() is None for p in processes) and time.time() < deadline:
                if any(p.poll() not in (None, 0) for p in processes):
                    break
                time.sleep(0.5)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for index, process in enumerate(processes):
            with open(os.path.join(tmp, f"worker{index}.log")) as f:
                self.assertEqual(process.returncode, 0, f.read()[-4000:])

        single_dir = os.path.join(tmp, "single")
        main.run(
            _config(_argv(data_dir, single_dir, *COMMON)), strategy=tf.distribute.get_strategy()
        )

        workers = _read_csv(os.path.join(worker_dir, "training_log.csv"))
        single = _read_csv(os.path.join(single_dir, "training_log.csv"))
        self.assertLen(workers, 3)
        self.assertEqual(tf.train.latest_checkpoint(worker_dir), os.path.join(worker_dir, "ckpt-3"))
        for step, (one, two) in enumerate(zip(single, workers)):
            for key in ("sup/loss", "unsup/loss", "total_loss"):
                rtol = 1e-5 if step == 0 else 1e-2
                self.assertAllClose(float(one[key]), float(two[key]), rtol=rtol, msg=key)


if __name__ == "__main__":
    tf.test.main()
