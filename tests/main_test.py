"""Tests of the training driver (uda_tf/main.py, train.py, callbacks.py) on a tiny tree."""

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests import run_helpers
from uda_tf import config as config_lib
from uda_tf import evaluate, main, train
from uda_tf.callbacks import eval_input
from uda_tf.data import cityscapes, sources

# Short names, also imported by multi_worker_test.py.
REPO = run_helpers.REPO
_argv = run_helpers.tiny_argv
_config = run_helpers.parse_config
_read_csv = run_helpers.read_csv
_temp_dir = run_helpers.temp_dir
_make_tree = run_helpers.make_tree


def _events(directory: str) -> dict[str, dict[int, object]]:
    """tag -> step -> (plugin name, value) of the event files in a directory."""
    found = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                found.setdefault(value.tag, {})[event.step] = (
                    plugin,
                    tf.make_ndarray(value.tensor),
                )
    return found


class TinyRunTest(tf.test.TestCase):
    """One in-process run (train 6 steps with UDA, evaluate), checked from every side."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = _make_tree()
        cls.model_dir = os.path.join(tempfile.mkdtemp(), "run")
        cls.cfg = _config(_argv(cls.data_dir, cls.model_dir))
        cls.results = main.run(cls.cfg)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        shutil.rmtree(os.path.dirname(cls.model_dir), ignore_errors=True)
        super().tearDownClass()

    def test_flags_json_is_the_resolved_config(self):
        with open(os.path.join(self.model_dir, "FLAGS.json")) as f:
            written = config_lib.Config.from_dict(json.load(f))
        self.assertEqual(
            written,
            dataclasses.replace(
                self.cfg, model=dataclasses.replace(self.cfg.model, synchronized_bn=False)
            ),
        )

    def test_labeled_file_list(self):
        with open(os.path.join(self.model_dir, "labeled_files.txt")) as f:
            names = f.read().split()
        self.assertLen(names, 4)  # --sup_size=4 of the 6 train images.
        self.assertEqual(names, sorted(names))

    def test_checkpoints_every_save_steps_keeping_max_save(self):
        self.assertEqual(
            tf.train.latest_checkpoint(self.model_dir), os.path.join(self.model_dir, "ckpt-6")
        )
        # --max_save=1: ckpt-3 was written, then deleted.
        self.assertFalse(os.path.exists(os.path.join(self.model_dir, "ckpt-3.index")))

    def test_results_file(self):
        results = evaluate.parse_results(os.path.join(self.model_dir, "results.txt"))
        self.assertEqual(results.pop("global_step"), 6)
        self.assertEqual(
            sorted(results),
            sorted(["mean_iou", "pixel_accuracy"] + [f"iou/{n}" for n in cityscapes.CLASS_NAMES]),
        )
        for key, value in self.results.items():
            self.assertAllClose(results[key], value, atol=1e-6, msg=key)
        per_class = [results[f"iou/{n}"] for n in cityscapes.CLASS_NAMES]
        self.assertAllClose(results["mean_iou"], np.nanmean(per_class), atol=1e-6)

    def test_the_checkpoint_holds_the_evaluated_ema_network(self):
        network = train.load_inference_model(self.model_dir)
        confusion = evaluate.confusion_matrix(
            network, eval_input(self.cfg), num_classes=19, ignore_label=255
        )
        results = evaluate.results_from_confusion(confusion, cityscapes.CLASS_NAMES)
        self.assertAllClose(results["mean_iou"], self.results["mean_iou"], atol=1e-6)

    def test_csv_log_one_row_per_save_steps_with_the_schedule_lr(self):
        rows = _read_csv(os.path.join(self.model_dir, "training_log.csv"))
        self.assertEqual([row["epoch"] for row in rows], ["0", "1"])
        self.assertContainsSubset(
            {"sup/loss", "unsup/loss", "unsup/high_prob_ratio", "total_loss", "lr"}, rows[0]
        )
        self.assertFalse(any(key.startswith("val_") for key in rows[0]))
        # The logged LR is the one of the last step of the epoch (steps 2 and 5).
        for row, step in zip(rows, (2, 5)):
            expected = 0.03 * math.cos(7 / 8 * math.pi / 2 * step / 6)
            self.assertAllClose(float(row["lr"]), expected, rtol=1e-5)

    def test_evaluation_along_training_on_the_dev_split(self):
        rows = _read_csv(os.path.join(self.model_dir, "training_log.csv"))
        eval_events = _events(os.path.join(self.model_dir, "eval"))
        # Step 0 (training begins), then every --save_steps.
        self.assertEqual(sorted(eval_events["dev/mean_iou"]), [0, 3, 6])
        self.assertIn("dev/iou/road", eval_events)
        self.assertAllClose(float(rows[1]["dev/mean_iou"]), eval_events["dev/mean_iou"][6][1])
        # The dev split (2 train images held out of the labeled subset), with the final EMA.
        network = train.load_inference_model(self.model_dir)
        confusion = evaluate.confusion_matrix(
            network, eval_input(self.cfg, split="dev"), num_classes=19, ignore_label=255
        )
        results = evaluate.results_from_confusion(confusion, cityscapes.CLASS_NAMES)
        self.assertAllClose(float(rows[1]["dev/mean_iou"]), results["mean_iou"], atol=1e-6)

    def test_dev_evaluation_at_step_0_is_the_untrained_network(self):
        # The same seed builds the same initial weights: the step-0 dev mIoU is theirs.
        keras.utils.set_random_seed(self.cfg.train.seed)
        model, _ = train.build_uda_model(self.cfg, tf.distribute.get_strategy())
        confusion = evaluate.confusion_matrix(
            model.ema_network,
            eval_input(self.cfg, split="dev"),
            num_classes=19,
            ignore_label=255,
        )
        untrained = evaluate.results_from_confusion(confusion, cityscapes.CLASS_NAMES)
        logged = _events(os.path.join(self.model_dir, "eval"))["dev/mean_iou"]
        self.assertAllClose(logged[0][1], untrained["mean_iou"], atol=1e-6)
        self.assertNotAllClose(logged[0][1], logged[6][1])
        # dev_results.txt: a line "<step> <mIoU>" per evaluation, the logged values.
        with open(os.path.join(self.model_dir, "dev_results.txt")) as f:
            lines = [line.split() for line in f]
        self.assertEqual([int(step) for step, _ in lines], [0, 3, 6])
        for step, value in lines:
            self.assertAllClose(float(value), logged[int(step)][1], atol=1e-6)

    def test_tensorboard_scalars_and_images(self):
        train_events = _events(os.path.join(self.model_dir, "train"))
        for tag in ("sup/loss", "unsup/loss", "total_loss", "lr"):
            self.assertEqual(sorted(train_events[tag]), [3, 6], tag)
            self.assertEqual(train_events[tag][3][0], "scalars")
        eval_events = _events(os.path.join(self.model_dir, "eval"))
        plugin, images = eval_events["input|prediction|ground_truth"][6]
        self.assertEqual(plugin, "images")
        self.assertEqual(images[:2].tolist(), [b"384", b"64"])  # width 3 x 128, height 64
        self.assertLen(images, 2 + 2)
        self.assertAllClose(eval_events["mean_iou"][6][1], self.results["mean_iou"], atol=1e-6)

    def test_colourised_predictions(self):
        preds = sorted(glob.glob(os.path.join(self.model_dir, "predictions", "*_pred.png")))
        self.assertLen(preds, 2)
        image = Image.open(preds[0])
        self.assertEqual((image.mode, image.size), ("P", (128, 64)))
        self.assertLess(np.array(image).max(), 19)
        self.assertEqual(image.getpalette()[:3], list(cityscapes.PALETTE[0]))

    def _copy(self, name: str) -> str:
        model_dir = os.path.join(_temp_dir(self), name)
        shutil.copytree(self.model_dir, model_dir)
        return model_dir

    def test_evaluation_only_uses_the_saved_model(self):
        model_dir = self._copy("eval_only")
        with open(os.path.join(model_dir, "FLAGS.json")) as f:
            flags_json = f.read()
        # No model flags: the defaults (DeepLabv3+) must not replace the run's U-Net.
        argv = [f"--data_dir={self.data_dir}", f"--model_dir={model_dir}", "--do_train=false"]
        results = main.run(_config(argv + ["--do_eval", "--num_vis_images=0"]))
        self.assertAllClose(results["mean_iou"], self.results["mean_iou"], atol=1e-6)
        with open(os.path.join(model_dir, "FLAGS.json")) as f:
            self.assertEqual(f.read(), flags_json)

    def test_a_rerun_refused_for_its_data_leaves_the_run_files(self):
        """FLAGS.json and labeled_files.txt are those of the run that trained the checkpoints."""
        model_dir = self._copy("refused")
        run_files = {}
        for name in ("FLAGS.json", "labeled_files.txt"):
            with open(os.path.join(model_dir, name), "rb") as f:
                run_files[name] = f.read()
        extra = ("--sup_size=3", "--train_steps=9", "--num_vis_images=0")
        train_images = {
            os.path.relpath(p, self.data_dir)
            for p in glob.glob(os.path.join(self.data_dir, "leftImg8bit/train/*/*.png"))
        }
        labeled = set(
            sources.labeled_filenames(_config(_argv(self.data_dir, model_dir, *extra)).data)
        )
        # Truncated labeled images fail the first checks; the others (dev split,
        # unlabeled) fail when the input is built, after the model.
        for truncated in (labeled, train_images - labeled):
            data_dir = os.path.join(_temp_dir(self), "bad")
            shutil.copytree(self.data_dir, data_dir)
            for name in truncated:
                with open(os.path.join(data_dir, name), "r+b") as f:
                    f.truncate(100)
            with self.assertRaisesRegex(ValueError, r"\.png: truncated or corrupt PNG"):
                main.run(_config(_argv(data_dir, model_dir, *extra)))
            for name, content in run_files.items():
                with open(os.path.join(model_dir, name), "rb") as f:
                    self.assertEqual(f.read(), content, f"{name} after truncating {truncated}")
        self.assertEmpty(glob.glob(os.path.join(model_dir, "*.tmp*")))

    def test_resuming_with_another_model_fails(self):
        model_dir = self._copy("other_model")
        cfg = _config(_argv(self.data_dir, model_dir, "--unet_filters=16"))
        with self.assertRaisesRegex(ValueError, r"--unet_filters=16 \(was 8\)"):
            main.run(cfg)

    def test_a_second_run_resumes_and_runs_only_the_remaining_steps(self):
        model_dir = self._copy("resumed")
        cfg = _config(_argv(self.data_dir, model_dir, "--train_steps=9", "--num_vis_images=0"))
        main.run(cfg)
        self.assertEqual(tf.train.latest_checkpoint(model_dir), os.path.join(model_dir, "ckpt-9"))
        rows = _read_csv(os.path.join(model_dir, "training_log.csv"))
        self.assertEqual([row["epoch"] for row in rows], ["0", "1", "2"])
        self.assertEqual(
            evaluate.parse_results(os.path.join(model_dir, "results.txt"))["global_step"], 9
        )

    def test_a_student_of_this_run_learns_from_its_fixed_ema_network(self):
        # --uda_target=teacher: self-training from this finished run.
        teacher_flags = ("--uda_target=teacher", f"--uda_teacher_dir={self.model_dir}")
        student_dir = os.path.join(_temp_dir(self), "student")
        cfg = _config(_argv(self.data_dir, student_dir, *teacher_flags, "--train_steps=3"))
        model, _ = train.build_uda_model(cfg, tf.distribute.get_strategy())
        images = tf.random.stateless_uniform([2, 64, 128, 3], [1, 2], 0, 255)
        expected = train.load_inference_model(self.model_dir)(images, training=False)
        self.assertAllClose(model.teacher_network(images, training=False), expected)
        self.assertFalse(model.teacher_network.trainable)
        before = set(os.listdir(self.model_dir))
        main.run(cfg, verbose=0)
        self.assertEqual(set(os.listdir(self.model_dir)), before)  # the teacher's run is untouched
        with open(os.path.join(student_dir, "FLAGS.json")) as f:
            self.assertEqual(json.load(f)["uda"]["uda_teacher_dir"], self.model_dir)
        # The student's checkpoint holds no teacher: the same variables as the teacher's own.
        names = lambda d: {n for n, _ in tf.train.list_variables(train.latest_checkpoint(d))}
        self.assertEqual(names(student_dir), names(self.model_dir))

    def test_a_teacher_dir_that_is_not_a_finished_run_of_these_classes_is_refused(self):
        tmp = _temp_dir(self)
        other_classes = self._copy("other_classes")
        with open(os.path.join(other_classes, "FLAGS.json")) as f:
            flags_json = json.load(f)
        flags_json["model"]["num_classes"] = 7
        with open(os.path.join(other_classes, "FLAGS.json"), "w") as f:
            json.dump(flags_json, f)
        own = os.path.join(tmp, "own")
        for teacher_dir, message in (
            (own, "is this run's --model_dir"),
            (os.path.join(tmp, "missing"), "has no FLAGS.json"),
            (other_classes, "predicts 7 classes, this run --num_classes=19"),
        ):
            argv = _argv(
                self.data_dir, own, "--uda_target=teacher", f"--uda_teacher_dir={teacher_dir}"
            )
            with self.assertRaisesRegex(ValueError, f"--uda_teacher_dir={teacher_dir}.*{message}"):
                main.run(_config(argv), verbose=0)


class ErrorsTest(tf.test.TestCase):
    """Bad flags and directories fail before training, naming what is wrong."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = _make_tree()
        cls.tmp = tempfile.mkdtemp()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_unwritable_model_dir(self):
        blocker = os.path.join(self.tmp, "a_file")
        with open(blocker, "w") as f:
            f.write("x")
        model_dir = os.path.join(blocker, "run")
        with self.assertRaisesRegex(ValueError, f"--model_dir={model_dir} is not writable"):
            main.run(_config(_argv(self.data_dir, model_dir)))

    def test_batch_not_divisible_by_replicas(self):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        cfg = _config(_argv(self.data_dir, os.path.join(self.tmp, "r"), "--train_batch_size=3"))
        with self.assertRaisesRegex(ValueError, "--train_batch_size=3 is invalid.*2 replicas"):
            main.run(cfg, strategy=strategy)

    def test_crop_larger_than_the_images(self):
        cfg = _config(_argv(self.data_dir, os.path.join(self.tmp, "c"), "--crop_height=128"))
        with self.assertRaisesRegex(ValueError, r"--crop_height=128 is invalid.*64x128"):
            main.run(cfg)

    def test_eval_without_a_checkpoint(self):
        model_dir = os.path.join(self.tmp, "empty")
        cfg = _config(_argv(self.data_dir, model_dir, "--do_train=false", "--dev_size=-1"))
        with self.assertRaisesRegex(ValueError, f"--model_dir={model_dir} has no FLAGS.json"):
            main.run(cfg)
        # FLAGS.json of a run that was killed before its first checkpoint.
        train.write_config(cfg, model_dir)
        with self.assertRaisesRegex(ValueError, f"--model_dir={model_dir} holds no checkpoint"):
            main.run(cfg)

    def test_wrong_num_classes(self):
        cfg = _config(_argv(self.data_dir, os.path.join(self.tmp, "k"), "--num_classes=5"))
        with self.assertRaisesRegex(ValueError, "--num_classes=5"):
            main.run(cfg)


@pytest.mark.slow
class NonFiniteLossTest(tf.test.TestCase):
    def test_a_diverging_run_stops_naming_the_step_and_each_loss(self):
        data_dir = _make_tree(_temp_dir(self))
        model_dir = os.path.join(_temp_dir(self), "nan")
        cfg = _config(
            _argv(data_dir, model_dir, "--learning_rate=1e30", "--iterations=1", "--save_steps=6")
        )
        with self.assertRaisesRegex(
            (FloatingPointError, tf.errors.InvalidArgumentError),
            r"(?s)Non-finite loss at step.*sup/loss.*unsup/loss.*total_loss",
        ):
            main.run(cfg)
        self.assertIsNone(tf.train.latest_checkpoint(model_dir))


@pytest.mark.slow
class MirroredTest(tf.test.TestCase):
    def test_two_replicas_give_the_losses_of_one(self):
        """The custom loop on 2 replicas reaches the losses of fit on 1 (same global batch).

        The first step matches to float rounding; later steps drift a little
        (synchronized BN sums in another order, and the confidence mask is a
        threshold).
        """
        data_dir = _make_tree(_temp_dir(self))
        logs = []
        for strategy in (
            tf.distribute.get_strategy(),
            tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
        ):
            model_dir = os.path.join(_temp_dir(self), "m")
            argv = _argv(data_dir, model_dir, "--num_vis_images=0", "--do_eval=false")
            cfg = _config(argv + ["--train_steps=3", "--save_steps=1", "--iterations=1"])
            main.run(cfg, strategy=strategy)
            logs.append(_read_csv(os.path.join(model_dir, "training_log.csv")))
        self.assertLen(logs[1], 3)
        for step, (one, two) in enumerate(zip(*logs)):
            for key in ("sup/loss", "unsup/loss", "total_loss"):
                rtol = 1e-5 if step == 0 else 1e-2
                self.assertAllClose(float(one[key]), float(two[key]), rtol=rtol, msg=key)


@pytest.mark.slow
class RepeatabilityTest(tf.test.TestCase):
    def test_the_same_command_twice_gives_the_same_losses_and_weights(self):
        data_dir = _make_tree(_temp_dir(self))
        runs = []
        for _ in range(2):
            model_dir = os.path.join(_temp_dir(self), "same")
            main.run(_config(_argv(data_dir, model_dir, "--num_vis_images=0", "--do_eval=false")))
            runs.append(model_dir)
        logs = [_read_csv(os.path.join(d, "training_log.csv")) for d in runs]
        for one, two in zip(*logs):
            for key in ("sup/loss", "unsup/loss", "total_loss"):
                self.assertAllClose(float(one[key]), float(two[key]), rtol=1e-6, msg=key)
        weights = [train.load_inference_model(d).get_weights() for d in runs]
        for one, two in zip(*weights):
            self.assertAllClose(one, two, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
class KillAndResumeTest(tf.test.TestCase):
    def test_sigkill_after_the_first_checkpoint_then_the_same_command(self):
        data_dir = _make_tree(_temp_dir(self))
        model_dir = os.path.join(_temp_dir(self), "killed")
        command = run_helpers.main_command(
            _argv(
                data_dir,
                model_dir,
                "--train_steps=30",
                "--save_steps=10",
                "--iterations=1",
                "--max_save=5",
                "--num_vis_images=0",
            )
        )
        log_path = os.path.join(os.path.dirname(model_dir), "first.log")
        process = run_helpers.start(command, log_path)
        try:
            saved = run_helpers.wait_until(
                lambda: tf.train.latest_checkpoint(model_dir) is not None,
                process,
                log_path,
                timeout=240,
            )
            if not saved:
                self.fail(f"No first checkpoint:\n{run_helpers.log_tail(log_path)}")
        finally:
            run_helpers.kill(process)
        killed_at = train.checkpoint_step(tf.train.latest_checkpoint(model_dir))
        self.assertLess(killed_at, 30)

        second = run_helpers.run(command)
        self.assertEqual(second.returncode, 0, second.stderr[-3000:])
        self.assertIn(f"step {killed_at}, {30 - killed_at} steps to go", second.stderr)
        self.assertEqual(tf.train.latest_checkpoint(model_dir), os.path.join(model_dir, "ckpt-30"))
        # The second process ran only the epochs (of 10 steps) after the checkpoint.
        epochs = re.findall(r"^Epoch (\d+)/3$", second.stdout, flags=re.MULTILINE)
        self.assertEqual([int(e) for e in epochs], list(range(killed_at // 10 + 1, 4)))
        results = evaluate.parse_results(os.path.join(model_dir, "results.txt"))
        self.assertEqual(results["global_step"], 30)
        self.assertTrue(0 <= results["mean_iou"] <= 1)


if __name__ == "__main__":
    tf.test.main()
