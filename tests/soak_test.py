"""Soak: a run SIGKILLed again and again, inside checkpoint saves too, ends as if never killed.

    python -m pytest -m slow tests/soak_test.py

A tiny deterministic run (a checkpoint every step, --max_save=2) runs
uninterrupted once, then again under tests/slow_saves.py, killed 6 times,
each time restarted with the same command: at random moments, and inside
each step of a save (tensors written but not yet in place, a checkpoint
complete but not yet recorded, an old checkpoint half deleted). The last
restart runs to the end; its final checkpoint must hold the uninterrupted
run's tensors exactly, and its training_log.csv the same rows.
"""

import os
import random
import re
import subprocess

import pytest
import tensorflow as tf
from absl import logging

from tests import run_helpers
from uda_tf import train

TRAIN_STEPS = 12
RUN_FLAGS = (
    "--deterministic",
    f"--train_steps={TRAIN_STEPS}",
    "--save_steps=1",
    "--iterations=1",
    "--max_save=2",
    "--num_vis_images=0",
    "--dev_size=-1",
    "--do_eval=false",
)
SEED = 20240516
# Where each kill lands: at a mark of tests/slow_saves.py (kind, path pattern), or at random.
KILLS = (
    ("merge", r"ckpt-\d+$"),
    ("state", r"ckpt-\d+$"),
    ("delete", r"\.data-\?{5}-of-\?{5}$"),
    ("random", None),
    ("random", None),
    ("random", None),
)
PAUSE_S = 0.3


def _marks(path: str) -> list[tuple[str, str]]:
    """The (kind, path) marks a process wrote so far."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.split(" ", 1)) for line in f.read().splitlines() if " " in line]


def _ended_within(process: subprocess.Popen, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _restored_step(log_path: str) -> int | None:
    """The step a process resumed at (0: a fresh start); None if it was killed before."""
    with open(log_path) as f:
        text = f.read()
    match = re.search(r"Restored \S+: step (\d+)", text)
    if match:
        return int(match.group(1))
    return 0 if "Epoch 1/" in text else None


@pytest.mark.slow
class SoakTest(tf.test.TestCase):
    def _kill_at(self, command, kind: str, pattern: str | None, *, attempt: int, rng) -> int:
        """Starts `command`, SIGKILLs it at the moment `kind` says; returns its restored step."""
        tmp = self.tmp
        log_path = os.path.join(tmp, f"attempt_{attempt}.log")
        marks = os.path.join(tmp, f"marks_{attempt}")
        pause = "0" if kind == "random" else str(PAUSE_S)
        process = run_helpers.start(command, log_path, UDA_SAVE_MARKS=marks, UDA_SAVE_PAUSE=pause)
        try:
            if kind == "random":  # Some time after the first save began: in a step or a save.
                hit = run_helpers.wait_until(lambda: _marks(marks), process, log_path, poll=0.05)
                hit = hit and not _ended_within(process, rng.uniform(0.0, 3.0))
            else:  # This process's second such mark: it saved once before, so it progresses.

                def reached():
                    found = [p for k, p in _marks(marks) if k == kind and re.search(pattern, p)]
                    return len(found) >= 2

                hit = run_helpers.wait_until(reached, process, log_path, poll=0.02)
            self.assertTrue(hit, f"{kind}: no kill point\n{run_helpers.log_tail(log_path)}")
        finally:
            run_helpers.kill(process)
        logging.info("Kill %d (%s) after %s.", attempt, kind, (_marks(marks) or ["-"])[-1])
        return _restored_step(log_path)

    def test_a_run_killed_six_times_ends_with_the_uninterrupted_weights(self):
        self.tmp = run_helpers.temp_dir(self)
        data_dir = run_helpers.make_tree(os.path.join(self.tmp, "data"))
        reference = os.path.join(self.tmp, "reference")
        done = run_helpers.run(
            run_helpers.main_command(run_helpers.tiny_argv(data_dir, reference, *RUN_FLAGS))
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])

        model_dir = os.path.join(self.tmp, "killed")
        argv = run_helpers.tiny_argv(data_dir, model_dir, *RUN_FLAGS)
        command = run_helpers.main_command(argv, module="tests.slow_saves")
        rng = random.Random(SEED)
        plan = list(KILLS)
        rng.shuffle(plan)
        restored = [
            self._kill_at(command, kind, pattern, attempt=i, rng=rng)
            for i, (kind, pattern) in enumerate(plan)
        ]
        final_log = os.path.join(self.tmp, "final.log")
        process = run_helpers.start(command, final_log, UDA_SAVE_MARKS=os.devnull)
        process.wait(timeout=900)
        self.assertEqual(process.returncode, 0, run_helpers.log_tail(final_log))
        restored.append(_restored_step(final_log))
        logging.info("Kills %s; restored steps %s.", plan, restored)
        # Each restart resumed at or after the one before: a kill loses no checkpoint.
        steps = [s for s in restored if s is not None]
        self.assertEqual(steps, sorted(steps), restored)
        self.assertGreater(steps[-1], 0)

        final = os.path.join(model_dir, f"ckpt-{TRAIN_STEPS}")
        self.assertEqual(train.latest_checkpoint(model_dir), final)
        expected = run_helpers.checkpoint_tensors(os.path.join(reference, f"ckpt-{TRAIN_STEPS}"))
        tensors = run_helpers.checkpoint_tensors(final)
        self.assertEqual(sorted(tensors), sorted(expected))
        for name, value in expected.items():
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH":
                self.assertAllEqual(tensors[name], value, msg=name)
        rows = run_helpers.read_csv(os.path.join(model_dir, "training_log.csv"))
        self.assertEqual(rows, run_helpers.read_csv(os.path.join(reference, "training_log.csv")))
