"""Tests of uda_tf.export.tflite (LiteRT conversion and checks)."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests.export.helpers import HEIGHT, WIDTH, scenes, tiny_trained_model
from uda_tf.export import serving
from uda_tf.export import tflite as tflite_lib


class TFLiteTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            raise cls.skipException("ai_edge_litert is not installed.")
        cls.model = tiny_trained_model()
        calibration, _ = scenes(16, seed=3)
        cls.images, _ = scenes(8, seed=4)
        cls.keras_prob = tf.nn.softmax(cls.model(cls.images.astype(np.float32))).numpy()
        cls.tflite = {
            q: tflite_lib.convert_tflite(
                cls.model,
                quantization=q,
                height=HEIGHT,
                width=WIDTH,
                representative_images=calibration if q == "int8" else None,
            )
            for q in tflite_lib.QUANTIZATIONS
        }

    @parameterized.parameters(("float32", 0.999), ("float16", 0.995), ("int8", 0.97))
    def test_agreement_with_keras(self, quantization, min_agreement):
        out = tflite_lib.run_tflite(self.tflite[quantization], self.images)
        keras_classes = np.argmax(self.keras_prob, axis=-1)
        self.assertGreaterEqual(np.mean(out[serving.CLASSES] == keras_classes), min_agreement)
        self.assertEqual(out[serving.CLASSES].dtype, np.int32)
        atol = {"float32": 1e-4, "float16": 2e-2, "int8": 0.1}[quantization]
        self.assertAllClose(out[serving.PROBABILITIES], self.keras_prob, atol=atol, rtol=0)

    def test_sizes_and_io(self):
        sizes = {q: len(b) for q, b in self.tflite.items()}
        self.assertLess(sizes["float16"], 0.7 * sizes["float32"])
        self.assertLess(sizes["int8"], 0.5 * sizes["float32"])
        for content in self.tflite.values():
            interpreter = tflite_lib.load_tflite(content)
            runner = interpreter.get_signature_runner(tflite_lib.SIGNATURE_KEY)
            image = runner.get_input_details()[serving.IMAGES]
            self.assertEqual(image["dtype"], np.uint8)
            self.assertAllEqual(image["shape"], [1, HEIGHT, WIDTH, 3])
            # Raw pixels: no input quantization to apply, int8 included.
            self.assertIn(image["quantization"], [(0.0, 0), (1.0, 0)])
            self.assertCountEqual(
                runner.get_output_details(), [serving.CLASSES, serving.PROBABILITIES]
            )

    def test_classes_only(self):
        content = tflite_lib.convert_tflite(
            self.model, quantization="float32", height=32, width=64, probabilities=False
        )
        out = tflite_lib.run_tflite(content, self.images[:2, :32, :64])
        self.assertCountEqual(out, [serving.CLASSES])
        keras_prob = self.model(self.images[:2, :32, :64].astype(np.float32))
        self.assertAllEqual(out[serving.CLASSES], np.argmax(keras_prob, axis=-1))

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, r"--tflite='int4'.*float32"):
            tflite_lib.convert_tflite(self.model, quantization="int4", height=8, width=8)
        with self.assertRaisesRegex(ValueError, "int8 TFLite needs representative_images"):
            tflite_lib.convert_tflite(self.model, quantization="int8", height=8, width=8)
        with self.assertRaisesRegex(ValueError, r"expected uint8 \[8, 8, 3\]"):
            tflite_lib.convert_tflite(
                self.model,
                quantization="int8",
                height=8,
                width=8,
                representative_images=self.images,
            )
        with self.assertRaisesRegex(ValueError, r"expected uint8 images \[N, 64, 128, 3\]"):
            tflite_lib.run_tflite(self.tflite["float32"], self.images[:, :32])
        with self.assertRaisesRegex(ValueError, "does not exist"):
            tflite_lib.run_tflite("/nonexistent/model.tflite", self.images)

    def test_compare_and_table(self):
        rows = tflite_lib.compare_tflite(
            self.model, {"float32": self.tflite["float32"]}, self.images[:2]
        )
        self.assertEqual(rows[0]["name"], "float32")
        self.assertAlmostEqual(rows[0]["size_mb"], len(self.tflite["float32"]) / 2**20)
        self.assertGreaterEqual(rows[0]["agreement"], 0.999)
        self.assertGreater(rows[0]["latency_ms"], 0)
        self.assertIn("float32", tflite_lib.format_table(rows))
