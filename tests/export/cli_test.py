"""Tests of `python -m uda_tf.export` (uda_tf.export.cli)."""

import hashlib
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from tests.export.helpers import REPO_ROOT, fake_run
from uda_tf import config as config_lib
from uda_tf import train
from uda_tf.export import cli, saved_model
from uda_tf.export import tflite as tflite_lib


def _digests(folder: str) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder` (folders end with /)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = ""
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return out


class CommandTest(tf.test.TestCase):
    @pytest.mark.slow
    def test_export_model_dir(self):
        root = tempfile.mkdtemp()
        model_dir = fake_run(root)
        export_dir = os.path.join(root, "export")
        outputs = cli.export_model_dir(
            model_dir,
            export_dir,
            tflite=["float32", "int8"],
            representative_steps=1,
            compare_images=2,
        )
        tflite_dir = os.path.join(export_dir, "tflite", "1")
        self.assertEqual(
            outputs,
            {
                "saved_model": os.path.join(export_dir, "1"),
                "float32": os.path.join(tflite_dir, "uda_float32_32x64.tflite"),
                "int8": os.path.join(tflite_dir, "uda_int8_32x64.tflite"),
                "report": os.path.join(tflite_dir, "report.txt"),
            },
        )
        with open(outputs["report"]) as f:
            report = f.read()
        self.assertRegex(report, r"float32 .*\| +100\.00 %")
        self.assertIn("int8", report)
        # The served weights are the checkpoint's.
        network = train.load_inference_model(model_dir)
        images = np.random.default_rng(5).integers(0, 256, [1, 40, 72, 3], np.uint8)
        expected = tf.nn.softmax(network(images.astype(np.float32)))
        served = tf.saved_model.load(outputs["saved_model"]).signatures["serving_default"]
        self.assertAllClose(served(images=images)["probabilities"], expected, atol=1e-4, rtol=0)
        with self.assertRaisesRegex(ValueError, r"--tflite='int4'"):
            cli.export_model_dir(model_dir, export_dir, tflite=["int4"])
        self.assertEqual(saved_model.next_version(export_dir), 2)  # Nothing written.

    def test_a_failed_export_publishes_no_version(self):
        root = tempfile.mkdtemp()
        model_dir = fake_run(root)
        export_dir = os.path.join(root, "export")
        cli.export_model_dir(model_dir, export_dir, tflite=[])
        intact = _digests(export_dir)
        self.assertEqual(sorted(os.listdir(export_dir)), ["1"])
        # int8 calibration reads a --data_dir that has moved: nothing is written.
        moved = os.path.join(root, "moved")
        with self.assertRaisesRegex(ValueError, f"--data_dir={moved}: not a directory"):
            cli.export_model_dir(model_dir, export_dir, tflite=["int8"], data_dir=moved)
        self.assertEqual(_digests(export_dir), intact)
        # A failure after the SavedModel and a TFLite file are written, in the
        # report: neither version 2 nor tflite/2 appears, no temporary is left.
        with (
            mock.patch.object(tflite_lib, "compare_tflite", side_effect=OSError("disk full")),
            self.assertRaisesRegex(OSError, "disk full"),
        ):
            cli.export_model_dir(model_dir, export_dir, tflite=["float32"], compare_images=1)
        self.assertEqual(_digests(export_dir), intact)
        self.assertEqual(saved_model.next_version(export_dir), 2)

    @pytest.mark.slow
    def test_no_checkpoint_is_a_clean_error(self):
        model_dir = tempfile.mkdtemp()
        train.write_config(config_lib.Config(), model_dir)
        result = subprocess.run(
            [sys.executable, "-m", "uda_tf.export", f"--model_dir={model_dir}"]
            + [f"--export_dir={model_dir}/export"],
            check=False,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("uda_tf.export: error:", result.stderr)
        self.assertIn(f"--model_dir={model_dir} holds no checkpoint", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
