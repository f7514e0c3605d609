"""Tests of uda_tf.export (SavedModel for TF Serving) and uda_tf.export_tflite."""

import base64
import functools
import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from uda_tf import config as config_lib
from uda_tf import export, export_tflite, fake_cityscapes, models, train
from uda_tf.models import build_model

NUM_CLASSES = 4
HEIGHT, WIDTH = 64, 128
# Class colours of the synthetic scenes (RGB).
PALETTE = np.array([[200, 60, 50], [40, 160, 70], [50, 70, 190], [220, 210, 80]], np.float32)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scenes(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [num, H, W, 3] of coloured rectangles and their masks [num, H, W]."""
    rng = np.random.default_rng(seed)
    masks = np.zeros([num, HEIGHT, WIDTH], np.uint8)
    for i in range(num):
        masks[i] = rng.integers(NUM_CLASSES)
        for _ in range(4):
            top, left = rng.integers(0, HEIGHT - 8), rng.integers(0, WIDTH - 8)
            h, w = rng.integers(8, HEIGHT // 2), rng.integers(8, WIDTH // 2)
            masks[i, top : top + h, left : left + w] = rng.integers(NUM_CLASSES)
    images = PALETTE[masks] + rng.normal(0, 12, [num, HEIGHT, WIDTH, 3])
    return np.clip(np.round(images), 0, 255).astype(np.uint8), masks


@functools.cache
def _tiny_trained_model() -> keras.Model:
    """A U-Net fitted briefly to the synthetic scenes, so that its logits are separated."""
    keras.utils.set_random_seed(0)
    model = build_model("unet", NUM_CLASSES, unet_depth=2, unet_filters=8)
    images, masks = _scenes(32, seed=1)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images.astype(np.float32), masks, batch_size=8, epochs=6, verbose=0)
    return model


def _png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def _png_bomb(height: int, width: int) -> bytes:
    """A PNG signature and IHDR chunk declaring height x width, then junk."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + b"\0" * 64


def _jpeg_bomb(image: np.ndarray, height: int, width: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to declare height x width."""
    data = bytearray(tf.io.encode_jpeg(image).numpy())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


class ExportTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.model = _tiny_trained_model()
        cls.images, cls.masks = _scenes(4, seed=2)
        cls.keras_prob = tf.nn.softmax(cls.model(cls.images.astype(np.float32))).numpy()
        cls.export_dir = os.path.join(cls.tmp, "export")
        cls.path = export.export_saved_model(cls.model, cls.export_dir)
        cls.loaded = tf.saved_model.load(cls.path)

    def _serve(self, images):
        return self.loaded.signatures[export.SERVING_DEFAULT](images=tf.constant(images))

    def _serve_encoded(self, image_bytes):
        return self.loaded.signatures[export.PREDICT_ENCODED](image_bytes=tf.constant(image_bytes))

    def test_tf_serving_layout_and_versions(self):
        self.assertEqual(self.path, os.path.join(self.export_dir, "1"))
        self.assertTrue(os.path.isfile(os.path.join(self.path, "saved_model.pb")))
        self.assertTrue(os.path.isdir(os.path.join(self.path, "variables")))
        self.assertEqual(sorted(os.listdir(self.export_dir)), ["1"])  # No temporary left.
        self.assertEqual(export.next_version(self.export_dir), 2)
        with self.assertRaisesRegex(ValueError, r"export/1 already exists.*--version"):
            export.export_saved_model(self.model, self.export_dir, version=1)
        with self.assertRaisesRegex(ValueError, "--max_pixels=0"):
            export.export_saved_model(self.model, self.export_dir, max_pixels=0)

    def test_signatures(self):
        signatures = self.loaded.signatures
        self.assertCountEqual(
            signatures,
            [export.SERVING_DEFAULT, export.PREDICT_ENCODED, export.PREDICT_ENCODED_CLASSES],
        )
        outputs = signatures[export.SERVING_DEFAULT].structured_outputs
        self.assertEqual(outputs[export.CLASSES].dtype, tf.int32)
        self.assertEqual(outputs[export.PROBABILITIES].dtype, tf.float32)
        spec = signatures[export.PREDICT_ENCODED].structured_input_signature[1]
        self.assertEqual(spec[export.IMAGE_BYTES].dtype, tf.string)

    @parameterized.parameters((HEIGHT, WIDTH), (37, 53))
    def test_serving_default_matches_keras(self, height, width):
        images = self.images[:2, :height, :width]
        expected = tf.nn.softmax(self.model(images.astype(np.float32))).numpy()
        out = self._serve(images)
        self.assertAllClose(out[export.PROBABILITIES], expected, atol=1e-4, rtol=0)
        self.assertAllEqual(out[export.CLASSES], np.argmax(expected, axis=-1))
        self.assertEqual(out[export.CLASSES].shape, (2, height, width))

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

    def test_predict_encoded_png_equals_serving_default(self):
        pngs = tf.constant([_png(image) for image in self.images])
        out = self._serve_encoded(pngs)
        expected = self._serve(self.images)
        self.assertAllEqual(out[export.CLASSES], expected[export.CLASSES])
        self.assertAllClose(out[export.PROBABILITIES], expected[export.PROBABILITIES], atol=1e-6)
        classes_only = self.loaded.signatures[export.PREDICT_ENCODED_CLASSES](image_bytes=pngs)
        self.assertCountEqual(classes_only, [export.CLASSES])
        self.assertAllEqual(classes_only[export.CLASSES], expected[export.CLASSES])

    def test_predict_encoded_jpeg_grey_and_rgba(self):
        jpeg = tf.io.encode_jpeg(self.images[0], quality=90).numpy()
        expected = self._serve(tf.io.decode_jpeg(jpeg, channels=3)[None])
        self.assertAllEqual(self._serve_encoded([jpeg])[export.CLASSES], expected[export.CLASSES])
        grey = self.images[:1, ..., :1]
        rgba = np.concatenate([self.images[:1], np.full_like(grey, 255)], axis=-1)
        out = self._serve_encoded([_png(grey[0]), _png(rgba[0])])
        self.assertAllEqual(out[export.CLASSES][0], self._serve(np.tile(grey, 3))["classes"][0])
        self.assertAllEqual(out[export.CLASSES][1], self._serve(self.images[:1])["classes"][0])

    def test_rest_request_body(self):
        # The body of the README's REST example, decoded as TF Serving does:
        # a {"b64": ...} object becomes the bytes of one element of a string tensor.
        body = json.dumps(
            {
                "signature_name": "predict_encoded",
                "instances": [
                    {"b64": base64.b64encode(_png(image)).decode("ascii")}
                    for image in self.images[:2]
                ],
            }
        )
        request = json.loads(body)
        image_bytes = [base64.b64decode(instance["b64"]) for instance in request["instances"]]
        out = self.loaded.signatures[request["signature_name"]](
            image_bytes=tf.constant(image_bytes)
        )
        self.assertAllClose(out[export.PROBABILITIES], self.keras_prob[:2], atol=1e-4, rtol=0)

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
        png = _png(self.images[0])
        cases = [
            ([b"GIF89a not supported"], r"image_bytes\[i\] is neither a PNG nor a JPEG.*\[0\]"),
            ([png, b""], r"image_bytes\[i\] is neither a PNG nor a JPEG.*\[1\]"),
            ([png[:20]], r"truncated or corrupt PNG \(no IHDR\)"),
            ([png[:100]], "Invalid PNG data"),
            (
                [png, _png(self.images[1, :32])],
                r"must have the same size.*\[\[64 128\]\s*\[32 128\]\]",
            ),
            ([], "image_bytes holds no image"),
            ([_png_bomb(100_000, 100_000)], r"larger than --max_pixels=33554432.*100000 100000"),
            ([_jpeg_bomb(self.images[0], 60_000, 60_000)], r"--max_pixels.*60000 60000"),
        ]
        for image_bytes, message in cases:
            with (
                self.subTest(message),
                self.assertRaisesRegex(tf.errors.InvalidArgumentError, message),
            ):
                self._serve_encoded(tf.constant(image_bytes, tf.string))

    def test_decode_images_pixel_limit(self):
        png = tf.constant([_png(self.images[0])])
        decode = tf.function(lambda x, limit: export.decode_images(x, max_pixels=limit))
        self.assertAllEqual(decode(png, HEIGHT * WIDTH)[0], self.images[0])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "--max_pixels=8191"):
            decode(png, HEIGHT * WIDTH - 1)

    def test_encoded_image_size(self):
        image = self.images[0, :37, :53]
        for data in (_png(image), tf.io.encode_jpeg(image).numpy()):
            self.assertAllEqual(export.encoded_image_size(tf.constant(data)), [37, 53])


class TFLiteTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            raise cls.skipException("ai_edge_litert is not installed.")
        cls.model = _tiny_trained_model()
        calibration, _ = _scenes(16, seed=3)
        cls.images, _ = _scenes(8, seed=4)
        cls.keras_prob = tf.nn.softmax(cls.model(cls.images.astype(np.float32))).numpy()
        cls.tflite = {
            q: export_tflite.convert_tflite(
                cls.model,
                quantization=q,
                height=HEIGHT,
                width=WIDTH,
                representative_images=calibration if q == "int8" else None,
            )
            for q in export_tflite.QUANTIZATIONS
        }

    @parameterized.parameters(("float32", 0.999), ("float16", 0.995), ("int8", 0.97))
    def test_agreement_with_keras(self, quantization, min_agreement):
        out = export_tflite.run_tflite(self.tflite[quantization], self.images)
        keras_classes = np.argmax(self.keras_prob, axis=-1)
        self.assertGreaterEqual(np.mean(out[export.CLASSES] == keras_classes), min_agreement)
        self.assertEqual(out[export.CLASSES].dtype, np.int32)
        atol = {"float32": 1e-4, "float16": 2e-2, "int8": 0.1}[quantization]
        self.assertAllClose(out[export.PROBABILITIES], self.keras_prob, atol=atol, rtol=0)

    def test_sizes_and_io(self):
        sizes = {q: len(b) for q, b in self.tflite.items()}
        self.assertLess(sizes["float16"], 0.7 * sizes["float32"])
        self.assertLess(sizes["int8"], 0.5 * sizes["float32"])
        for content in self.tflite.values():
            interpreter = export_tflite.load_tflite(content)
            runner = interpreter.get_signature_runner(export_tflite.SIGNATURE_KEY)
            image = runner.get_input_details()[export.IMAGES]
            self.assertEqual(image["dtype"], np.uint8)
            self.assertAllEqual(image["shape"], [1, HEIGHT, WIDTH, 3])
            # Raw pixels: no input quantization to apply, int8 included.
            self.assertIn(image["quantization"], [(0.0, 0), (1.0, 0)])
            self.assertCountEqual(
                runner.get_output_details(), [export.CLASSES, export.PROBABILITIES]
            )

    def test_classes_only(self):
        content = export_tflite.convert_tflite(
            self.model, quantization="float32", height=32, width=64, probabilities=False
        )
        out = export_tflite.run_tflite(content, self.images[:2, :32, :64])
        self.assertCountEqual(out, [export.CLASSES])
        keras_prob = self.model(self.images[:2, :32, :64].astype(np.float32))
        self.assertAllEqual(out[export.CLASSES], np.argmax(keras_prob, axis=-1))

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, r"--tflite='int4'.*float32"):
            export_tflite.convert_tflite(self.model, quantization="int4", height=8, width=8)
        with self.assertRaisesRegex(ValueError, "int8 TFLite needs representative_images"):
            export_tflite.convert_tflite(self.model, quantization="int8", height=8, width=8)
        with self.assertRaisesRegex(ValueError, r"expected uint8 \[8, 8, 3\]"):
            export_tflite.convert_tflite(
                self.model,
                quantization="int8",
                height=8,
                width=8,
                representative_images=self.images,
            )
        with self.assertRaisesRegex(ValueError, r"expected uint8 images \[N, 64, 128, 3\]"):
            export_tflite.run_tflite(self.tflite["float32"], self.images[:, :32])
        with self.assertRaisesRegex(ValueError, "does not exist"):
            export_tflite.run_tflite("/nonexistent/model.tflite", self.images)

    def test_compare_and_table(self):
        rows = export_tflite.compare_tflite(
            self.model, {"float32": self.tflite["float32"]}, self.images[:2]
        )
        self.assertEqual(rows[0]["name"], "float32")
        self.assertAlmostEqual(rows[0]["size_mb"], len(self.tflite["float32"]) / 2**20)
        self.assertGreaterEqual(rows[0]["agreement"], 0.999)
        self.assertGreater(rows[0]["latency_ms"], 0)
        self.assertIn("float32", export_tflite.format_table(rows))


def _fake_run(root: str) -> str:
    """A model_dir (FLAGS.json, one checkpoint of a tiny U-Net) over a generated tree."""
    data_dir = os.path.join(root, "cityscapes")
    fake_cityscapes.generate(data_dir, num_train=4, num_val=2, num_extra=0, height=64, width=128)
    model_dir = os.path.join(root, "run")
    cfg = config_lib.Config(
        data=config_lib.DataConfig(
            data_dir=data_dir, crop_height=32, crop_width=64, train_batch_size=2, eval_batch_size=2
        ),
        model=config_lib.ModelConfig(model_name="unet", unet_depth=2, unet_filters=8),
        train=config_lib.TrainConfig(model_dir=model_dir),
    )
    train.write_config(cfg, model_dir)
    network = models.build_model_from_config(cfg.model)
    checkpoint = tf.train.Checkpoint(ema_network=network)
    tf.train.CheckpointManager(checkpoint, model_dir, 1, checkpoint_name="ckpt").save(1)
    return model_dir


class CommandTest(tf.test.TestCase):
    @pytest.mark.slow
    def test_export_model_dir(self):
        root = tempfile.mkdtemp()
        model_dir = _fake_run(root)
        export_dir = os.path.join(root, "export")
        outputs = export.export_model_dir(
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
            export.export_model_dir(model_dir, export_dir, tflite=["int4"])
        self.assertEqual(export.next_version(export_dir), 2)  # Nothing written.

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
