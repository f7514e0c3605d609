"""The tf.data service as processes: `python -m uda_tf.data.service` servers and a training run.

Every server listens on 127.0.0.1 and stops by itself (--run_seconds), and the
test kills what is left when it ends.
"""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys

import pytest
import tensorflow as tf

from tests.main_test import REPO, _argv, _config, _make_tree, _read_csv, _temp_dir
from uda_tf import config as config_lib
from uda_tf import main
from uda_tf.data import service, streams

COMMON = ("--num_vis_images=0", "--do_eval=false", "--train_steps=3", "--save_steps=1",
          "--iterations=1")  # fmt: skip
LIFETIME = "--run_seconds=600"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _next_within(iterator, seconds: float):
    """next(iterator), or a test failure after `seconds` (a stuck read never hangs the test)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(next, iterator).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@pytest.mark.slow
class ServiceProcessTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.tmp = _temp_dir(self)
        self.port = _free_port()
        self.address = f"grpc://127.0.0.1:{self.port}"

    def _server(self, role: str, *args: str, log: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "uda_tf.data.service", f"--role={role}", LIFETIME, *args]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        with open(os.path.join(self.tmp, log), "a") as f:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=f)
        self.addCleanup(_kill, process)
        return process

    def _dispatcher(self) -> subprocess.Popen:
        work_dir = os.path.join(self.tmp, "dispatcher")
        return self._server(
            "dispatcher", f"--port={self.port}", f"--work_dir={work_dir}", log="dispatcher.log"
        )

    def _workers(self, n: int) -> list[subprocess.Popen]:
        return [
            self._server(
                "worker",
                f"--dispatcher_address=127.0.0.1:{self.port}",
                "--heartbeat_interval_ms=200",
                log=f"worker{i}.log",
            )
            for i in range(n)
        ]

    def test_a_run_through_one_worker_trains_as_local_input(self):
        data_dir = _make_tree(os.path.join(self.tmp, "data"))
        self._dispatcher()
        self._workers(1)
        remote_dir = os.path.join(self.tmp, "remote")
        remote = _argv(data_dir, remote_dir, *COMMON, f"--data_service_address={self.address}")
        main.run(_config(remote), strategy=tf.distribute.get_strategy())
        local_dir = os.path.join(self.tmp, "local")
        main.run(
            _config(_argv(data_dir, local_dir, *COMMON)), strategy=tf.distribute.get_strategy()
        )
        # One worker makes the local batches, bit for bit: the same losses.
        remote_log = _read_csv(os.path.join(remote_dir, "training_log.csv"))
        local_log = _read_csv(os.path.join(local_dir, "training_log.csv"))
        self.assertLen(remote_log, 3)
        for one, two in zip(local_log, remote_log, strict=True):
            for key in ("sup/loss", "unsup/loss", "total_loss"):
                self.assertAllClose(float(one[key]), float(two[key]), rtol=1e-6, msg=key)

    def test_two_workers_and_a_restarted_dispatcher(self):
        data_dir = _make_tree(os.path.join(self.tmp, "data"))
        dispatcher = self._dispatcher()
        self._workers(2)
        cfg = config_lib.DataConfig(
            data_dir=data_dir, train_batch_size=2, unsup_ratio=1, crop_height=48, crop_width=80
        )
        ds = service.distribute(streams.train_dataset(cfg, splittable=True), self.address)
        iterator = iter(ds)
        for _ in range(3):
            batch = _next_within(iterator, 240)
            self.assertEqual(batch["aug_image"].shape, (2, 48, 80, 3))
        # Fault-tolerant mode: a dispatcher restarted on its work_dir recovers
        # its job; the workers re-register and the trainer keeps reading.
        dispatcher.send_signal(signal.SIGKILL)
        dispatcher.wait(timeout=30)
        self._dispatcher()
        for _ in range(3):
            _next_within(iterator, 240)
        fresh = iter(service.distribute(streams.train_dataset(cfg, splittable=True), self.address))
        self.assertEqual(_next_within(fresh, 240)["image"].shape, (2, 48, 80, 3))
        with open(os.path.join(self.tmp, "dispatcher.log")) as f:
            self.assertIn("serving at", f.read())


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)


if __name__ == "__main__":
    tf.test.main()
