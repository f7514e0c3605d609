"""Tests of train.py's checkpoints and resume: broken files, the fall-back, resumed streams.

One deterministic 4-step run (a checkpoint every step) is the reference;
each test copies it, breaks or removes files the way a crash, a full disk or
a bad copy does, and runs the same command again.
"""

import os
import shutil
import tempfile

import tensorflow as tf
from absl.testing import parameterized
from tensorflow.python.framework import config as tf_config  # disable_op_determinism

from tests import run_helpers
from uda_tf import checkpoints, main, train

# Four steps, a checkpoint after each, all kept; no evaluation.
RUN_FLAGS = (
    "--deterministic",
    "--train_steps=4",
    "--save_steps=1",
    "--iterations=1",
    "--max_save=5",
    "--num_vis_images=0",
    "--dev_size=-1",
    "--do_eval=false",
)
DATA = "ckpt-4.data-00000-of-00001"


def _config(data_dir: str, model_dir: str, *extra: str):
    return run_helpers.parse_config(run_helpers.tiny_argv(data_dir, model_dir, *RUN_FLAGS, *extra))


def _file_states(directory: str) -> dict[str, tuple[int, str]]:
    """name -> (mtime_ns, sha256) of the checkpoint files: rewritten files change either."""
    digests = run_helpers.file_digests(directory)
    return {n: (os.stat(os.path.join(directory, n)).st_mtime_ns, d) for n, d in digests.items()}


def _break(model_dir: str, fault: str) -> None:
    """Breaks ckpt-4 (or the state file) of `model_dir` as `fault` says."""
    prefix = os.path.join(model_dir, "ckpt-4")
    data = os.path.join(model_dir, DATA)
    if fault == "missing_index":
        os.remove(prefix + ".index")
    elif fault == "truncated_data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif fault == "deleted_data":
        os.remove(data)
    elif fault == "garbage_state":
        with open(os.path.join(model_dir, "checkpoint"), "wb") as f:
            f.write(b"\x00\x17 not a CheckpointState {{{")
    else:
        raise ValueError(fault)


# The warning that names each skipped checkpoint, per fault.
_MESSAGES = {
    "missing_index": r"ckpt-4\b.*ckpt-4\.index is missing",
    "truncated_data": r"ckpt-4\b.*Read less bytes than requested",
    "deleted_data": r"ckpt-4\b.*ckpt-4\.data-00000-of-00001.*No such file",
}


class CheckpointRecoveryTest(parameterized.TestCase, tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.data_dir = run_helpers.make_tree(os.path.join(cls.tmp, "data"))
        cls.model_dir = os.path.join(cls.tmp, "run")
        main.run(_config(cls.data_dir, cls.model_dir))
        cls.final = run_helpers.checkpoint_tensors(os.path.join(cls.model_dir, "ckpt-4"))
        cls.log_rows = run_helpers.read_csv(os.path.join(cls.model_dir, "training_log.csv"))

    @classmethod
    def tearDownClass(cls):
        tf_config.disable_op_determinism()  # --deterministic turned it on for the process.
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def _copy(self) -> str:
        model_dir = os.path.join(run_helpers.temp_dir(self), "run")
        shutil.copytree(self.model_dir, model_dir)
        return model_dir

    def _assert_final_weights(self, model_dir: str) -> None:
        """ckpt-4 of `model_dir` holds exactly the uninterrupted run's tensors."""
        tensors = run_helpers.checkpoint_tensors(os.path.join(model_dir, "ckpt-4"))
        self.assertEqual(sorted(tensors), sorted(self.final))
        for name, value in self.final.items():
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH":
                self.assertAllEqual(tensors[name], value, msg=name)

    def _assert_log_is_the_uninterrupted_one(self, model_dir: str) -> None:
        rows = run_helpers.read_csv(os.path.join(model_dir, "training_log.csv"))
        self.assertEqual([row["epoch"] for row in rows], ["0", "1", "2", "3"])
        self.assertEqual(rows, self.log_rows)

    @parameterized.parameters("missing_index", "truncated_data", "deleted_data")
    def test_evaluation_and_export_skip_a_broken_newest_checkpoint(self, fault):
        model_dir = self._copy()
        _break(model_dir, fault)
        before = _file_states(model_dir)
        with self.assertLogs(logger="absl", level="WARNING") as logs:
            path = train.latest_checkpoint(model_dir)
        self.assertEqual(path, os.path.join(model_dir, "ckpt-3"))
        self.assertRegex("\n".join(logs.output), _MESSAGES[fault])
        # Reading moves, deletes and rewrites nothing.
        self.assertEqual(_file_states(model_dir), before)
        self.assertFalse(os.path.exists(os.path.join(model_dir, checkpoints.BROKEN_DIR)))

    @parameterized.parameters("missing_index", "truncated_data", "deleted_data")
    def test_the_same_command_resumes_from_the_newest_intact_checkpoint(self, fault):
        model_dir = self._copy()
        _break(model_dir, fault)
        broken = sorted(n for n in os.listdir(model_dir) if n.startswith("ckpt-4."))
        intact = {n: s for n, s in _file_states(model_dir).items() if not n.startswith("ckpt-4.")}
        with self.assertLogs(logger="absl", level="WARNING") as logs:
            main.run(_config(self.data_dir, model_dir))
        self.assertRegex("\n".join(logs.output), _MESSAGES[fault])
        # ckpt-1..3 untouched, the broken files moved aside, ckpt-4 trained again.
        states = _file_states(model_dir)
        self.assertEqual({n: states[n] for n in intact}, intact)
        self.assertEqual(
            sorted(os.listdir(os.path.join(model_dir, checkpoints.BROKEN_DIR))), broken
        )
        self._assert_final_weights(model_dir)
        self._assert_log_is_the_uninterrupted_one(model_dir)
        state = tf.train.get_checkpoint_state(model_dir)
        self.assertEqual(
            [os.path.basename(p) for p in state.all_model_checkpoint_paths],
            ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"],
        )

    def test_a_garbage_state_file_is_rebuilt_from_the_checkpoint_files(self):
        model_dir = self._copy()
        _break(model_dir, "garbage_state")
        before = _file_states(model_dir)
        with self.assertLogs(logger="absl", level="WARNING") as logs:
            main.run(_config(self.data_dir, model_dir))
        self.assertRegex("\n".join(logs.output), r"checkpoint.* rewritten.*ckpt-4")
        # Step 4 was restored: nothing trained again, nothing rewritten.
        self.assertEqual(_file_states(model_dir), before)
        self._assert_log_is_the_uninterrupted_one(model_dir)
        state = tf.train.get_checkpoint_state(model_dir)
        self.assertEqual(state.model_checkpoint_path, os.path.join(model_dir, "ckpt-4"))
        self.assertLen(state.all_model_checkpoint_paths, 4)
        # A manager on the rebuilt state rotates these (it would not, without timestamps).
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(), model_dir, max_to_keep=5)
        self.assertLen(manager.checkpoints, 4)

    def test_no_intact_checkpoint_stops_and_lists_them(self):
        model_dir = self._copy()
        for step in (1, 2, 3, 4):
            os.remove(os.path.join(model_dir, f"ckpt-{step}.index"))
        before = _file_states(model_dir)
        message = r"no checkpoint reads back whole: ckpt-4 .*ckpt-3 .*ckpt-2 .*ckpt-1 "
        with self.assertRaisesRegex(ValueError, message):
            main.run(_config(self.data_dir, model_dir))
        with self.assertRaisesRegex(ValueError, message):
            train.latest_checkpoint(model_dir)
        self.assertEqual(_file_states(model_dir), before)

    def test_a_run_resumed_at_step_2_ends_with_the_weights_of_the_uninterrupted_run(self):
        """As if killed during step 3: ckpt-3 and ckpt-4 never written, nor their log rows."""
        model_dir = self._copy()
        for name in os.listdir(model_dir):
            if name.startswith(("ckpt-3.", "ckpt-4.")):
                os.remove(os.path.join(model_dir, name))
        tf.compat.v1.train.update_checkpoint_state(
            model_dir, "ckpt-2", all_model_checkpoint_paths=["ckpt-1", "ckpt-2"]
        )
        log_path = os.path.join(model_dir, "training_log.csv")
        with open(log_path) as f:
            lines = f.readlines()
        with open(log_path, "w") as f:
            f.writelines(lines[:3])  # The header, epochs 0 and 1.
        main.run(_config(self.data_dir, model_dir))
        self._assert_final_weights(model_dir)
        self._assert_log_is_the_uninterrupted_one(model_dir)


class TrainInputTest(tf.test.TestCase):
    def test_starting_at_a_step_continues_the_streams_of_step_0(self):
        data_dir = run_helpers.make_tree(run_helpers.temp_dir(self))
        cfg = _config(data_dir, os.path.join(run_helpers.temp_dir(self), "run"))
        strategy = tf.distribute.get_strategy()
        # 4 labeled and 10 unlabeled images, batches of 2 and 2: step 3 is in the 2nd epoch.
        batches = list(train.train_input(cfg, strategy).take(6))
        resumed = list(train.train_input(cfg, strategy, start_step=3).take(3))
        for step, batch in enumerate(resumed, start=3):
            self.assertEqual(sorted(batch), sorted(batches[step]))
            for key, value in batch.items():
                self.assertAllEqual(value, batches[step][key], msg=f"step {step}, {key}")


if __name__ == "__main__":
    tf.test.main()
