"""Tests for uda_tf.models: shapes, strides, serialization, export, weights."""

import functools
import math
import os
import re

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from uda_tf import config as config_lib
from uda_tf import models
from uda_tf.models import backbones

NUM_CLASSES = 5
# Tiny widths: <= 16 channels in the head, a few dozen in the backbones.
_WIDTH = {
    "resnet50": 1 / 16,
    "resnet101": 1 / 16,
    "mobilenetv1": 1 / 16,
    "mobilenetv2": 0.1,
    "mobilenetv2_torchvision": 0.1,
    "xception": 1 / 16,
}
_TINY_UNET = {"unet_depth": 3, "unet_filters": 8}


@functools.cache
def _deeplab(backbone, output_stride=16):
    keras.utils.set_random_seed(1)
    return models.build_model(
        "deeplabv3plus",
        NUM_CLASSES,
        backbone=backbone,
        output_stride=output_stride,
        backbone_width=_WIDTH[backbone],
        decoder_filters=16,
    )


@functools.cache
def _unet():
    keras.utils.set_random_seed(1)
    return models.build_model("unet", NUM_CLASSES, **_TINY_UNET)


def _model(key):
    return _unet() if key == "unet" else _deeplab(*key)


def _images(h=65, w=129, n=2, seed=0):
    return tf.random.stateless_uniform([n, h, w, 3], [seed, 0], 0, 255.0)


def _normalise(x, normalization="imagenet"):
    mean, std = backbones.NORMALIZATIONS[normalization]
    return (x - np.float32(mean)) / np.float32(std)


_ALL_MODELS = [
    ("resnet50", ("resnet50",)),
    ("resnet50_os8", ("resnet50", 8)),
    ("resnet101", ("resnet101",)),
    ("mobilenetv1", ("mobilenetv1",)),
    ("mobilenetv2", ("mobilenetv2",)),
    ("mobilenetv2_torchvision", ("mobilenetv2_torchvision",)),
    ("xception", ("xception",)),
    ("unet", "unet"),
]


class ShapeTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(*_ALL_MODELS)
    def test_logits_at_input_size(self, key):
        model = _model(key)
        for h, w in ((65, 129), (33, 47)):
            logits = model(_images(h, w), training=False)
            self.assertEqual(logits.shape, (2, h, w, NUM_CLASSES))
            self.assertEqual(logits.dtype, tf.float32)
            self.assertTrue(np.isfinite(logits.numpy()).all())

    @parameterized.product(backbone=backbones.BACKBONES, output_stride=(8, 16))
    def test_backbone_feature_strides(self, backbone, output_stride):
        net = _deeplab(backbone, output_stride).get_layer("backbone")
        for h, w in ((64, 128), (65, 129)):
            low, high = net(_normalise(_images(h, w, n=1)))
            self.assertEqual(low.shape[1:3], (math.ceil(h / 4), math.ceil(w / 4)))
            self.assertEqual(
                high.shape[1:3], (math.ceil(h / output_stride), math.ceil(w / output_stride))
            )

    @parameterized.parameters(*backbones.BACKBONES)
    def test_dilation_keeps_every_layer(self, backbone):
        os8 = _deeplab(backbone, 8).get_layer("backbone")
        os16 = _deeplab(backbone, 16).get_layer("backbone")
        self.assertEqual(os8.count_params(), os16.count_params())
        self.assertEqual([l.name for l in os8.layers], [l.name for l in os16.layers])
        rates = [max(getattr(l, "dilation_rate", (1,))) for l in os8.layers]
        self.assertEqual(max(rates), 4)
        self.assertEqual(max(max(getattr(l, "dilation_rate", (1,))) for l in os16.layers), 2)
        aspp = {os: _deeplab(backbone, os).get_layer("aspp_conv3").dilation_rate for os in (8, 16)}
        self.assertEqual(aspp, {8: (36, 36), 16: (18, 18)})

    def test_layer_names_are_snake_case(self):
        names = [l.name for l in _unet().layers]
        for backbone in ("mobilenetv1", "mobilenetv2", "mobilenetv2_torchvision"):
            model = _deeplab(backbone)
            names += [l.name for l in model.layers]
            names += [l.name for l in model.get_layer("backbone").layers]
        bad = [n for n in names if not re.fullmatch(r"[a-z0-9_]+", n)]
        self.assertEqual(bad, [])

    def test_uint8_input_is_cast(self):
        model = _unet()
        x = tf.cast(_images(), tf.uint8)
        self.assertAllClose(model(x), model(tf.cast(x, tf.float32)), atol=0, rtol=0)

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_mixed_precision_gives_float32_logits(self, policy):
        previous = keras.mixed_precision.global_policy()
        try:
            keras.mixed_precision.set_global_policy(policy)
            for name in ("deeplabv3plus", "unet"):
                model = models.build_model(
                    name,
                    3,
                    backbone="mobilenetv2",
                    backbone_width=0.1,
                    decoder_filters=8,
                    **_TINY_UNET,
                )
                self.assertEqual(model.get_layer("logits").compute_dtype, "float32")
                inner = "decoder_conv1" if name == "deeplabv3plus" else "enc1_conv1"
                self.assertEqual(model.get_layer(inner).compute_dtype, policy[len("mixed_") :])
                logits = model(_images(33, 47, n=1))
                self.assertEqual(logits.dtype, tf.float32)
                self.assertEqual(logits.shape, (1, 33, 47, 3))
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def test_bad_arguments_raise(self):
        with self.assertRaisesRegex(ValueError, "model_name='segnet'"):
            models.build_model("segnet", 3)
        with self.assertRaisesRegex(ValueError, "'vgg16'"):
            models.build_model("deeplabv3plus", 3, backbone="vgg16")
        with self.assertRaisesRegex(ValueError, "output_stride=4"):
            models.build_model("deeplabv3plus", 3, output_stride=4)
        with self.assertRaisesRegex(ValueError, "--decoder_filters=0"):
            models.build_model("deeplabv3plus", 3, decoder_filters=0)
        with self.assertRaisesRegex(ValueError, "input_normalization='caffe'"):
            models.build_model("deeplabv3plus", 3, input_normalization="caffe")

    def test_build_from_config(self):
        cfg = config_lib.ModelConfig(model_name="unet", num_classes=3, unet_depth=2, unet_filters=4)
        model = models.build_model_from_config(cfg, name="small")
        self.assertEqual(model.name, "small")
        self.assertEqual(model.depth, 2)
        self.assertEqual(model(_images(33, 47, n=1)).shape, (1, 33, 47, 3))
        cfg = config_lib.ModelConfig(
            num_classes=3, backbone="mobilenetv1", backbone_width=0.25, decoder_filters=8
        )
        model = models.build_model_from_config(cfg)
        self.assertEqual((model.backbone_width, model.decoder_filters), (0.25, 8))
        self.assertEqual(model.get_layer("decoder_conv1").filters, 8)
        self.assertEqual(model.get_layer("backbone").get_layer("conv1").filters, 8)

    @parameterized.parameters(
        ("resnet50", "imagenet"),
        ("mobilenetv1", "tf"),
        ("mobilenetv2", "tf"),
        ("mobilenetv2_torchvision", "imagenet"),
        ("xception", "tf"),
    )
    def test_input_normalization_follows_the_backbone(self, backbone, normalization):
        model = _deeplab(backbone)
        self.assertEqual(model.input_normalization, normalization)
        layer = model.get_layer("normalization")
        mean, std = backbones.NORMALIZATIONS[normalization]
        self.assertEqual((layer.mean, layer.std), (tuple(mean), tuple(std)))
        x = _images(33, 47, n=1)
        self.assertAllClose(layer(x), _normalise(x, normalization), atol=1e-6)
        self.assertEqual(model.get_config()["input_normalization"], normalization)

    def test_torchvision_pads_stride_2_convs_symmetrically(self):
        tv = backbones.build_backbone("mobilenetv2_torchvision", width=0.35)
        keras_net = backbones.build_backbone("mobilenetv2", width=0.35)
        keras_net.set_weights(tv.get_weights())
        self.assertEqual(tv.count_params(), keras_net.count_params())
        x = _normalise(_images(64, 96, n=1))
        kernel = tv.get_layer("conv1").kernel
        expected = tf.nn.conv2d(x, kernel, 2, padding=[[0, 0], [1, 1], [1, 1], [0, 0]])
        conv1 = keras.Model(tv.input, tv.get_layer("conv1").output)
        self.assertAllClose(conv1(x), expected, atol=1e-5)
        # keras pads (0, 1) on even sizes: another sampling grid, the same layer otherwise.
        keras_conv1 = keras.Model(keras_net.input, keras_net.get_layer("conv1").output)
        self.assertNotAllClose(keras_conv1(x), expected)
        self.assertAllClose(
            keras_conv1(x), tf.nn.conv2d(x, kernel, 2, [[0, 0], [0, 1], [0, 1], [0, 0]]), atol=1e-5
        )
        pads = [l.name for l in tv.layers if isinstance(l, keras.layers.ZeroPadding2D)]
        self.assertEqual(pads, ["conv1_pad"] + [f"block_{i}_pad" for i in (1, 3, 6, 13)])


class SerializationTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("deeplab", ("xception",)),
        ("mobilenetv1", ("mobilenetv1",)),
        ("mobilenetv2_torchvision", ("mobilenetv2_torchvision",)),
        ("unet", "unet"),
    )
    def test_config_round_trip(self, key):
        model = _model(key)
        clone = type(model).from_config(model.get_config())
        self.assertEqual(clone.get_config(), model.get_config())
        clone.set_weights(model.get_weights())
        x = _images()
        self.assertAllClose(clone(x), model(x), atol=1e-5)

    def test_config_saved_before_decoder_filters_and_input_normalization(self):
        config = _deeplab("mobilenetv2").get_config()
        config["aspp_filters"] = config.pop("decoder_filters")
        del config["input_normalization"]
        clone = models.DeepLabV3Plus.from_config(config)
        self.assertEqual(clone.decoder_filters, 16)
        # Every backbone was fed ImageNet mean/std then.
        self.assertEqual(clone.input_normalization, "imagenet")

    def test_keras_file_round_trip(self):
        model = _deeplab("mobilenetv2")
        path = os.path.join(self.get_temp_dir(), "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        self.assertIsInstance(loaded, models.DeepLabV3Plus)
        x = _images()
        self.assertAllClose(loaded(x), model(x), atol=1e-5)

    def test_saved_model_and_tflite_agree_unet(self):
        self._check_saved_model_and_tflite_agree("unet")

    @pytest.mark.slow  # ~30 s on 2 cores; the U-Net case runs by default.
    def test_saved_model_and_tflite_agree_deeplab(self):
        self._check_saved_model_and_tflite_agree(("mobilenetv2",))

    def _check_saved_model_and_tflite_agree(self, key):
        model = _model(key)
        export_dir = os.path.join(self.get_temp_dir(), f"saved_{key[0]}")
        model.export(export_dir, verbose=False)
        x = _images(65, 129, n=1)
        expected = model(x, training=False).numpy()
        loaded = tf.saved_model.load(export_dir)  # Keep a reference to its variables.
        served = loaded.serve(x)
        self.assertAllClose(served, expected, atol=1e-4)
        converter = tf.lite.TFLiteConverter.from_saved_model(export_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            self.skipTest("ai_edge_litert is not installed")
        interpreter = Interpreter(model_content=converter.convert())
        (inp,) = interpreter.get_input_details()
        self.assertEqual(list(inp["shape_signature"]), [-1, -1, -1, 3])
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x.numpy())
        interpreter.invoke()
        out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        self.assertAllClose(out, expected, atol=1e-4)


class TrainingTest(tf.test.TestCase, parameterized.TestCase):
    def _fit(self, model, steps):
        x = _images(64, 64, n=4, seed=3)
        labels = tf.cast(x[..., 0] > 128.0, tf.int32) + 2 * tf.cast(x[..., 1] > 128.0, tf.int32)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,  # Tracing the train step costs more than 4 tiny steps.
        )
        return model.fit(x, labels, batch_size=4, epochs=steps, verbose=0).history["loss"]

    @parameterized.named_parameters(("deeplab", "deeplabv3plus", 1), ("unet", "unet", 2))
    def test_fit_lowers_loss_and_is_deterministic(self, name, num_runs):
        runs = []
        for _ in range(num_runs):
            keras.utils.set_random_seed(7)
            model = models.build_model(
                name, 4, backbone="mobilenetv2", backbone_width=0.1, decoder_filters=8, **_TINY_UNET
            )
            losses = self._fit(model, steps=3)
            self.assertLess(losses[-1], losses[0])
            runs.append(model.get_weights())
        for weights in runs[1:]:  # The same seed gives the same weights.
            for w, w_again in zip(runs[0], weights):
                self.assertAllEqual(w, w_again)


def _write_legacy_h5(path, named_weights):
    """Writes {layer: [arrays]} in the legacy format of the keras.applications files."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode("utf8") for n in named_weights]
        for name, arrays in named_weights.items():
            group = f.create_group(name)
            weight_names = [f"{name}/w{i}:0" for i in range(len(arrays))]
            group.attrs["weight_names"] = [n.encode("utf8") for n in weight_names]
            for weight_name, array in zip(weight_names, arrays):
                group.create_dataset(weight_name, data=array)


def _randomise_bn(net, seed):
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.uniform(-0.2, 0.2, c),
                    rng.uniform(-0.2, 0.2, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )


class BackboneWeightsTest(tf.test.TestCase, parameterized.TestCase):
    def test_weights_file_round_trip(self):
        model = _deeplab("resnet50")
        path = os.path.join(self.get_temp_dir(), "backbone.weights.h5")
        _randomise_bn(model.get_layer("backbone"), 0)
        model.get_layer("backbone").save_weights(path)
        kwargs = {
            "backbone": "resnet50",
            "backbone_width": _WIDTH["resnet50"],
            "decoder_filters": 16,
        }
        keras.utils.set_random_seed(2)
        fresh = models.build_model("deeplabv3plus", NUM_CLASSES, backbone_weights=path, **kwargs)
        keras.utils.set_random_seed(2)
        random = models.build_model("deeplabv3plus", NUM_CLASSES, **kwargs)
        x = _normalise(_images())
        expected = model.get_layer("backbone")(x)
        for a, b in zip(fresh.get_layer("backbone")(x), expected):
            self.assertAllClose(a, b, atol=0, rtol=0)
        self.assertNotAllClose(random.get_layer("backbone")(x)[1], expected[1])

    def test_mismatched_files_name_the_layer(self):
        path = os.path.join(self.get_temp_dir(), "resnet.weights.h5")
        _deeplab("resnet50").get_layer("backbone").save_weights(path)
        with self.assertRaisesRegex(ValueError, r"backbone layer 'conv1'.*not in the file"):
            models.build_model(
                "deeplabv3plus",
                3,
                backbone="mobilenetv2",
                backbone_width=0.1,
                decoder_filters=8,
                backbone_weights=path,
            )
        wider = backbones.build_backbone("resnet50", width=1 / 8)
        pattern = r"layer 'conv1_conv'.*expected .*\(7, 7, 3, 8\).*found .*\(7, 7, 3, 4\)"
        with self.assertRaisesRegex(ValueError, pattern):
            models.load_backbone_weights(wider, path, input_normalization="imagenet")
        with self.assertRaisesRegex(ValueError, "no such file"):
            models.load_backbone_weights(wider, path + ".missing", input_normalization="imagenet")

    @parameterized.parameters(
        ("resnet50", "imagenet"),
        ("mobilenetv1", "imagenet"),
        ("mobilenetv2", "imagenet"),
        ("xception", "imagenet"),
        ("mobilenetv1", "tf"),
        ("mobilenetv2", "tf"),
        ("xception", "tf"),
    )
    def test_keras_applications_file(self, name, normalization):
        """A legacy file holds a network fed keras preprocess_input: folded, or as it is."""
        width = {"mobilenetv1": 0.25, "mobilenetv2": 0.35}.get(name, 1 / 16)
        source = backbones.build_backbone(name, output_stride=32, width=width)
        _randomise_bn(source, 1)
        path = os.path.join(self.get_temp_dir(), f"{name}_notop.h5")
        _write_legacy_h5(path, _keras_applications_layout(source, name))
        target = backbones.build_backbone(name, output_stride=32, width=width)
        models.load_backbone_weights(target, path, input_normalization=normalization)
        x = _images(96, 96, n=1)
        if name == "resnet50":  # 'caffe': BGR minus the mean.
            preprocessed = x[..., ::-1] - np.float32([103.939, 116.779, 123.68])
        else:  # 'tf'
            preprocessed = x / 127.5 - 1.0
        low, expected_low = target(_normalise(x, normalization))[0], source(preprocessed)[0]
        target_weights, source_weights = target.get_weights(), source.get_weights()
        self.assertEqual(len(target_weights), len(source_weights))
        if normalization == "tf":  # The file's own preprocessing: nothing to fold.
            for a, b in zip(target_weights, source_weights):
                self.assertAllEqual(a, b)
            self.assertAllClose(low, expected_low, atol=1e-5)
            return
        # The first conv's zero padding stands for another colour: compare the
        # stride-4 features away from the border.
        scale = np.abs(expected_low.numpy()).max()
        self.assertAllClose(low[:, 5:-5, 5:-5], expected_low[:, 5:-5, 5:-5], atol=1e-4 * scale)
        # Every other weight is copied as it is (Xception's shortcuts included).
        folded = 2 if name == "resnet50" else 5
        for a, b in zip(target_weights[folded:], source_weights[folded:]):
            self.assertAllEqual(a, b)
        self.assertNotAllClose(target_weights[0], source_weights[0])

    def test_legacy_file_through_build_model(self):
        """build_model loads the file for the model's own input normalisation."""
        source = backbones.build_backbone("mobilenetv1", output_stride=16, width=0.25)
        _randomise_bn(source, 3)
        path = os.path.join(self.get_temp_dir(), "mobilenet_2_5_224_tf_no_top.h5")
        _write_legacy_h5(path, _keras_applications_layout(source, "mobilenetv1"))
        x = _images(64, 96, n=1)
        for normalization in (None, "imagenet"):
            model = models.build_model(
                "deeplabv3plus",
                3,
                backbone="mobilenetv1",
                backbone_width=0.25,
                decoder_filters=8,
                backbone_weights=path,
                input_normalization=normalization,
            )
            expected = backbones.build_backbone("mobilenetv1", width=0.25)
            models.load_backbone_weights(
                expected, path, input_normalization=model.input_normalization
            )
            for a, b in zip(model.get_layer("backbone").get_weights(), expected.get_weights()):
                self.assertAllEqual(a, b)
            self.assertEqual(model(x).shape, (1, 64, 96, 3))
            if normalization is None:  # "tf": the file's network exactly.
                self.assertEqual(model.input_normalization, "tf")
                features = model.get_layer("backbone")(model.get_layer("normalization")(x))
                self.assertAllClose(features[1], source(x / 127.5 - 1.0)[1], atol=1e-5)


def _keras_applications_layout(source, name):
    """{file layer name: arrays} as keras.applications names the layers of `source`."""
    named = {}
    shortcut = 0
    for layer in source.layers:
        if not layer.weights:
            continue
        file_name = layer.name.upper() if name == "mobilenetv2" else layer.name
        if "shortcut" in layer.name:  # Keras auto names, out of order.
            shortcut += 1
            kind = "batch_normalization" if layer.name.endswith("_bn") else "conv2d"
            file_name = f"{kind}_{9 - shortcut}"
        named[file_name] = [w.numpy() for w in layer.weights]
    named["predictions"] = [np.zeros((4, 2), np.float32)]  # An extra top is skipped.
    return named


_KERAS_APPS = {
    "resnet50": ("ResNet50", "resnet", "conv2_block3_out", "conv5_block3_out"),
    "resnet101": ("ResNet101", "resnet", "conv2_block3_out", "conv5_block3_out"),
    "mobilenetv1": ("MobileNet", "mobilenet", "conv_pw_3_relu", "conv_pw_13_relu"),
    "mobilenetv2": ("MobileNetV2", "mobilenet_v2", "block_2_depthwise_relu", "block_16_project_BN"),
    "xception": ("Xception", "xception", "block3_sepconv2_bn", "block14_sepconv2_act"),
}


@pytest.mark.slow
class KerasApplicationsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(*_KERAS_APPS)
    def test_loads_keras_applications_weights(self, name):
        """A keras.applications network's file gives the same features at output stride 32."""
        ctor, module, low_name, high_name = _KERAS_APPS[name]
        reference = getattr(keras.applications, ctor)(
            weights=None, include_top=False, input_shape=(None, None, 3)
        )
        _randomise_bn(reference, 2)
        path = os.path.join(self.get_temp_dir(), f"{name}_notop.h5")
        _write_legacy_h5(
            path, {l.name: [w.numpy() for w in l.weights] for l in reference.layers if l.weights}
        )
        ours = backbones.build_backbone(name, output_stride=32)
        self.assertEqual(
            ours.count_params(), reference.count_params() - (414720 if name == "mobilenetv2" else 0)
        )
        normalization = backbones.INPUT_NORMALIZATION[name]
        models.load_backbone_weights(ours, path, input_normalization=normalization)
        reference = keras.Model(
            reference.input,
            [reference.get_layer(low_name).output, reference.get_layer(high_name).output],
        )
        x = _images(160, 160, n=1)
        preprocess = getattr(keras.applications, module).preprocess_input
        expected_low, expected_high = reference(preprocess(x.numpy().copy()))
        low, high = ours(_normalise(x, normalization))
        low_scale = np.abs(expected_low.numpy()).max()
        high_scale = np.abs(expected_high.numpy()).max()
        if name.startswith("mobilenet"):  # The file's own preprocessing: exact.
            self.assertAllClose(low, expected_low, atol=1e-4 * low_scale)
            self.assertAllClose(high, expected_high, atol=1e-4 * high_scale)
            return
        if name != "xception":  # Keras's Xception stem is 'valid': another low-level size.
            crop = (slice(None), slice(6, -6), slice(6, -6))
            self.assertAllClose(low[crop], expected_low[crop], atol=1e-3 * low_scale)
        self.assertAllClose(high, expected_high, atol=2e-2 * high_scale)
