"""Tests of uda_tf.export.serving and uda_tf.export.saved_model (SavedModel for TF Serving)."""

import base64
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from tests.export.helpers import (
    HEIGHT,
    WIDTH,
    encode_png,
    jpeg_bomb,
    png_bomb,
    scenes,
    tiny_trained_model,
)
from uda_tf.export import saved_model, serving

# Bytes that are neither PNG nor JPEG, nor UTF-8: a GIF header, and random bytes.
GIF = b"GIF89a\xff\xfe\x00\x01" + b"\0" * 16
RANDOM_BYTES = b"\x9b\x01\xff\x00" + bytes(range(200, 256))


class ExportTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.model = tiny_trained_model()
        cls.images, cls.masks = scenes(4, seed=2)
        cls.keras_prob = tf.nn.softmax(cls.model(cls.images.astype(np.float32))).numpy()
        cls.export_dir = os.path.join(cls.tmp, "export")
        cls.path = saved_model.export_saved_model(cls.model, cls.export_dir)
        cls.loaded = tf.saved_model.load(cls.path)

    def _serve(self, images):
        return self.loaded.signatures[serving.SERVING_DEFAULT](images=tf.constant(images))

    def _serve_encoded(self, image_bytes):
        return self.loaded.signatures[serving.PREDICT_ENCODED](image_bytes=tf.constant(image_bytes))

    def test_tf_serving_layout_and_versions(self):
        self.assertEqual(self.path, os.path.join(self.export_dir, "1"))
        self.assertTrue(os.path.isfile(os.path.join(self.path, "saved_model.pb")))
        self.assertTrue(os.path.isdir(os.path.join(self.path, "variables")))
        self.assertEqual(sorted(os.listdir(self.export_dir)), ["1"])  # No temporary left.
        self.assertEqual(saved_model.next_version(self.export_dir), 2)
        with self.assertRaisesRegex(ValueError, r"export/1 already exists.*--version"):
            saved_model.export_saved_model(self.model, self.export_dir, version=1)
        with self.assertRaisesRegex(ValueError, "--max_pixels=0"):
            saved_model.export_saved_model(self.model, self.export_dir, max_pixels=0)

    def test_signatures(self):
        signatures = self.loaded.signatures
        self.assertCountEqual(
            signatures,
            [serving.SERVING_DEFAULT, serving.PREDICT_ENCODED, serving.PREDICT_ENCODED_CLASSES],
        )
        outputs = signatures[serving.SERVING_DEFAULT].structured_outputs
        self.assertEqual(outputs[serving.CLASSES].dtype, tf.int32)
        self.assertEqual(outputs[serving.PROBABILITIES].dtype, tf.float32)
        spec = signatures[serving.PREDICT_ENCODED].structured_input_signature[1]
        self.assertEqual(spec[serving.IMAGE_BYTES].dtype, tf.string)

    @parameterized.parameters((HEIGHT, WIDTH), (37, 53))
    def test_serving_default_matches_keras(self, height, width):
        images = self.images[:2, :height, :width]
        expected = tf.nn.softmax(self.model(images.astype(np.float32))).numpy()
        out = self._serve(images)
        self.assertAllClose(out[serving.PROBABILITIES], expected, atol=1e-4, rtol=0)
        self.assertAllEqual(out[serving.CLASSES], np.argmax(expected, axis=-1))
        self.assertEqual(out[serving.CLASSES].shape, (2, height, width))

    @pytest.mark.slow  # a second process (~11 s)
    def test_fresh_process_reload_matches_keras(self):
        inputs = os.path.join(self.tmp, "fresh_in.npy")
        outputs = os.path.join(self.tmp, "fresh_out.npy")
        np.save(inputs, self.images)
        script = (
            "import sys, numpy as np, tensorflow as tf\n"
            "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
            "np.save(sys.argv[3], f(images=tf.constant(np.load(sys.argv[2])))['probabilities'])\n"
        )
        subprocess.run(
            [sys.executable, "-c", script, self.path, inputs, outputs], check=True, timeout=120
        )
        self.assertAllClose(np.load(outputs), self.keras_prob, atol=1e-4, rtol=0)

    @pytest.mark.slow  # saved_model_cli in a subprocess (~9 s)
    def test_saved_model_cli_run_matches_keras(self):
        cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        if not os.path.exists(cli):
            self.skipTest("saved_model_cli is not installed beside python.")
        inputs = os.path.join(self.tmp, "cli_in.npy")
        out_dir = os.path.join(self.tmp, "cli_out")
        np.save(inputs, self.images)
        subprocess.run(
            [cli, "run", "--dir", self.path, "--tag_set", "serve"]
            + ["--signature_def", "serving_default", "--inputs", f"images={inputs}"]
            + ["--outdir", out_dir, "--overwrite"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        probabilities = np.load(os.path.join(out_dir, "probabilities.npy"))
        self.assertAllClose(probabilities, self.keras_prob, atol=1e-4, rtol=0)
        classes = np.load(os.path.join(out_dir, "classes.npy"))
        self.assertAllEqual(classes, np.argmax(self.keras_prob, axis=-1))

    def test_saved_model_cli_reports_bad_bytes_hex_escaped(self):
        cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        if not os.path.exists(cli):
            self.skipTest("saved_model_cli is not installed beside python.")
        inputs = os.path.join(self.tmp, "cli_gif.npy")
        np.save(inputs, np.array([GIF]))
        result = subprocess.run(
            [cli, "run", "--dir", self.path, "--tag_set", "serve"]
            + ["--signature_def", "predict_encoded", "--inputs", f"image_bytes={inputs}"]
            + ["--outdir", os.path.join(self.tmp, "cli_gif_out"), "--overwrite"],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("UnicodeDecodeError", result.stderr)
        self.assertRegex(
            result.stderr, r"(?s)neither a PNG nor a JPEG.*first bytes \(hex\):\W*47 49 46 38"
        )

    def test_predict_encoded_png_equals_serving_default(self):
        pngs = tf.constant([encode_png(image) for image in self.images])
        out = self._serve_encoded(pngs)
        expected = self._serve(self.images)
        self.assertAllEqual(out[serving.CLASSES], expected[serving.CLASSES])
        self.assertAllClose(out[serving.PROBABILITIES], expected[serving.PROBABILITIES], atol=1e-6)
        classes_only = self.loaded.signatures[serving.PREDICT_ENCODED_CLASSES](image_bytes=pngs)
        self.assertCountEqual(classes_only, [serving.CLASSES])
        self.assertAllEqual(classes_only[serving.CLASSES], expected[serving.CLASSES])

    def test_predict_encoded_jpeg_grey_and_rgba(self):
        jpeg = tf.io.encode_jpeg(self.images[0], quality=90).numpy()
        expected = self._serve(tf.io.decode_jpeg(jpeg, channels=3)[None])
        self.assertAllEqual(self._serve_encoded([jpeg])[serving.CLASSES], expected[serving.CLASSES])
        grey = self.images[:1, ..., :1]
        rgba = np.concatenate([self.images[:1], np.full_like(grey, 255)], axis=-1)
        out = self._serve_encoded([encode_png(grey[0]), encode_png(rgba[0])])
        self.assertAllEqual(out[serving.CLASSES][0], self._serve(np.tile(grey, 3))["classes"][0])
        self.assertAllEqual(out[serving.CLASSES][1], self._serve(self.images[:1])["classes"][0])

    def test_rest_request_body(self):
        # The body of the README's REST example, decoded as TF Serving does:
        # a {"b64": ...} object becomes the bytes of one element of a string tensor.
        body = json.dumps(
            {
                "signature_name": "predict_encoded",
                "instances": [
                    {"b64": base64.b64encode(encode_png(image)).decode("ascii")}
                    for image in self.images[:2]
                ],
            }
        )
        request = json.loads(body)
        image_bytes = [base64.b64decode(instance["b64"]) for instance in request["instances"]]
        out = self.loaded.signatures[request["signature_name"]](
            image_bytes=tf.constant(image_bytes)
        )
        self.assertAllClose(out[serving.PROBABILITIES], self.keras_prob[:2], atol=1e-4, rtol=0)

    @parameterized.named_parameters(
        ("rank_3", np.zeros([HEIGHT, WIDTH, 3], np.uint8), r"uint8 \[N, H, W, 3\].*\[64 128 3\]"),
        ("two_channels", np.zeros([1, 8, 8, 2], np.uint8), r"uint8 \[N, H, W, 3\].*\[1 8 8 2\]"),
        ("empty_batch", np.zeros([0, 8, 8, 3], np.uint8), r"N, H, W >= 1.*\[0 8 8 3\]"),
        ("float", np.zeros([1, 8, 8, 3], np.float32), "expected to be a uint8 tensor"),
    )
    def test_serving_default_errors(self, images, message):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
            self._serve(images)

    def test_predict_encoded_errors(self):
        png = encode_png(self.images[0])
        cases = [
            ([b"GIF89a not supported"], r"image_bytes\[i\] is neither a PNG nor a JPEG.*\[0\]"),
            ([png, b""], r"image_bytes\[i\] is neither a PNG nor a JPEG.*\[1\]"),
            ([png[:20]], r"truncated or corrupt PNG \(no IHDR\)"),
            ([png[:100]], "Invalid PNG data"),
            (
                [png, encode_png(self.images[1, :32])],
                r"must have the same size.*\[\[64 128\]\s*\[32 128\]\]",
            ),
            ([], "image_bytes holds no image"),
            ([png_bomb(100_000, 100_000)], r"larger than --max_pixels=33554432.*100000 100000"),
            ([jpeg_bomb(self.images[0], 60_000, 60_000)], r"--max_pixels.*60000 60000"),
            # Bytes that are not UTF-8 appear hex-escaped, never raw.
            ([GIF], r"neither a PNG nor a JPEG.*first bytes \(hex\):\W*47 49 46 38 39 61 ff fe"),
            ([png, RANDOM_BYTES], r"neither a PNG nor a JPEG.*\[1\].*\(hex\):\W*9b 01 ff 00 c8"),
            (png, r"expected image_bytes as string \[N\].*got a tensor of shape\] \[\]"),
            ([[png], [png]], r"expected image_bytes as string \[N\].*shape\] \[2 1\]"),
        ]
        for image_bytes, message in cases:
            with (
                self.subTest(message),
                self.assertRaisesRegex(tf.errors.InvalidArgumentError, message),
            ):
                self._serve_encoded(tf.constant(image_bytes, tf.string))

    def test_decode_images_pixel_limit(self):
        png = tf.constant([encode_png(self.images[0])])
        decode = tf.function(lambda x, limit: serving.decode_images(x, max_pixels=limit))
        self.assertAllEqual(decode(png, HEIGHT * WIDTH)[0], self.images[0])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "--max_pixels=8191"):
            decode(png, HEIGHT * WIDTH - 1)

    def test_encoded_image_size(self):
        image = self.images[0, :37, :53]
        for data in (encode_png(image), tf.io.encode_jpeg(image).numpy()):
            self.assertAllEqual(serving.encoded_image_size(tf.constant(data)), [37, 53])
