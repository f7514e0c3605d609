"""The real ImageNet files of ../shared/data/weights in our DeepLabv3+ backbones.

The loader's own tests (generated files in the keras.applications layout) are
in models_test.py. These check that the real files load, that our backbones
then compute keras.applications' features, and that pretrained weights learn
CamVid far faster than random ones. Each is skipped, saying why, when the
files or the data are absent.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from uda_tf import models
from uda_tf.models import backbones

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(_ROOT, "..", "shared", "data", "weights")
CAMVID_DIR = os.path.join(_ROOT, "..", "shared", "data", "camvid_240x180")
MOBILENET_V2_035 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
MOBILENET_075 = "mobilenet_7_5_224_tf_no_top.h5"
TORCHVISION_V2 = "torchvision_mobilenet_v2_1.0_224_keras_no_top.h5"
CAMVID_VOID = 11


def _weights(test, name):
    path = os.path.join(WEIGHTS_DIR, name)
    if not os.path.isfile(path):
        test.skipTest(f"{path} is absent (the ImageNet files of ../shared/data/weights).")
    return path


def _images(h, w, n=2, seed=0):
    return tf.random.stateless_uniform([n, h, w, 3], [seed, 0], 0, 255.0)


def _deeplab(backbone, width, path, output_stride=16, **kwargs):
    keras.utils.set_random_seed(0)
    return models.build_model(
        "deeplabv3plus",
        11,
        backbone=backbone,
        backbone_width=width,
        decoder_filters=16,
        output_stride=output_stride,
        backbone_weights=path,
        **kwargs,
    )


def _taps(model, names):
    """[N, H, W, 3] raw pixels -> the backbone's layers `names` (its own normalisation)."""
    net = model.get_layer("backbone")
    inner = keras.Model(net.input, [net.get_layer(n.lower()).output for n in names])
    normalization = model.get_layer("normalization")

    def call(x):
        outputs = inner(normalization(x))
        return outputs if isinstance(outputs, list) else [outputs]

    return call


# (our backbone, keras.applications constructor, width, file, taps that are
# stride <= 16 and precede the first dilated conv at output stride 16).
_CASES = {
    "mobilenetv2_035": (
        "mobilenetv2",
        "MobileNetV2",
        0.35,
        MOBILENET_V2_035,
        ("block_2_depthwise_relu", "block_6_expand_relu", "block_13_expand_relu"),
    ),
    "mobilenetv1_075": (
        "mobilenetv1",
        "MobileNet",
        0.75,
        MOBILENET_075,
        ("conv_pw_3_relu", "conv_pw_5_relu", "conv_pw_11_relu"),
    ),
    "torchvision_mobilenetv2_100": (
        "mobilenetv2",
        "MobileNetV2",
        1.0,
        TORCHVISION_V2,
        ("block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu"),
    ),
}
# The stride-32 end of each network, compared at output stride 32.
_LAST = {"MobileNetV2": "block_16_project_BN", "MobileNet": "conv_pw_13_relu"}


class RealWeightsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(*((k, *v) for k, v in _CASES.items()))
    def test_features_equal_keras_applications(self, backbone, ctor, width, name, taps):
        """Loaded into DeepLabv3+, the file gives keras.applications' features."""
        path = _weights(self, name)
        reference = getattr(keras.applications, ctor)(
            alpha=width, include_top=False, weights=None, input_shape=(None, None, 3)
        )
        reference.load_weights(path)
        # keras.applications pads stride-2 convs (0, 1) for unknown sizes, and
        # so does 'same' on even sizes: multiples of 32 keep every stage even.
        x = _images(96, 128)
        model = _deeplab(backbone, width, path)  # Output stride 16.
        self.assertEqual(model.input_normalization, "tf")
        # The end of the network, stride 32: the bare backbone at output stride 32.
        os32 = backbones.build_backbone(backbone, output_stride=32, width=width)
        models.load_backbone_weights(os32, path, input_normalization="tf")
        names = (*taps, _LAST[ctor])
        ours = _taps(model, taps)(x) + [os32(x / 127.5 - 1.0)[1]]
        expected = keras.Model(reference.input, [reference.get_layer(n).output for n in names])
        for tap, a, b in zip(names, ours, expected(x / 127.5 - 1.0)):
            scale = np.abs(b.numpy()).max()
            self.assertGreater(scale, 0.1, tap)
            self.assertAllClose(a, b, atol=1e-4 * scale, msg=tap)

    def test_torchvision_file_in_the_torchvision_backbone(self):
        """mobilenetv2_torchvision folds the file back to ImageNet mean/std inputs."""
        path = _weights(self, TORCHVISION_V2)
        tv = _deeplab("mobilenetv2_torchvision", 1.0, path)
        plain = _deeplab("mobilenetv2", 1.0, path)
        self.assertEqual(tv.input_normalization, "imagenet")
        changed = []
        for layer in tv.get_layer("backbone").layers:
            if not layer.weights:
                continue
            other = plain.get_layer("backbone").get_layer(layer.name)
            for i, (w, w_plain) in enumerate(zip(layer.get_weights(), other.get_weights())):
                if not np.array_equal(w, w_plain):
                    changed.append((layer.name, i))
        # Only the first conv's kernel and its BN's moving mean take the fold.
        self.assertEqual(changed, [("conv1", 0), ("bn_conv1", 2)])
        # Odd sizes: both paddings are symmetric; the two normalisations then
        # differ only where conv1 reads its zero padding.
        x = _images(97, 129)
        ours, theirs = _taps(tv, ("conv1_relu",))(x)[0], _taps(plain, ("conv1_relu",))(x)[0]
        self.assertAllClose(ours[:, 1:-1, 1:-1], theirs[:, 1:-1, 1:-1], atol=1e-4)
        self.assertNotAllClose(ours[:, -1], theirs[:, -1])

    def test_width_must_match_the_file(self):
        path = _weights(self, MOBILENET_V2_035)
        with self.assertRaisesRegex(ValueError, r"layer 'conv1'.*expected .*\(3, 3, 3, 32\)"):
            _deeplab("mobilenetv2", 1.0, path)


def _camvid(split, ids, size):
    """float32 images [N, h, w, 3] in [0, 255] and int32 labels [N, h, w] (void -> 255).

    Reads the SegNet layout directly (the readers' own tests are in tests/data/).
    """
    images, labels = [], []
    for frame in ids:
        image = tf.io.decode_jpeg(tf.io.read_file(f"{CAMVID_DIR}/{split}/images/{frame}.jpg"))
        label = tf.io.decode_png(tf.io.read_file(f"{CAMVID_DIR}/{split}/labels/{frame}.png"))
        images.append(tf.image.resize(image, size, antialias=True))
        labels.append(tf.image.resize(label, size, method="nearest")[..., 0])
    labels = tf.cast(tf.stack(labels), tf.int32)
    return tf.stack(images), tf.where(labels == CAMVID_VOID, 255, labels)


def _camvid_ids(split):
    if not os.path.isdir(CAMVID_DIR):
        raise FileNotFoundError(CAMVID_DIR)
    with open(os.path.join(CAMVID_DIR, f"{split}.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def _pixel_accuracy(model, images, labels):
    pred = tf.argmax(model.predict(images, batch_size=32, verbose=0), -1, output_type=tf.int32)
    valid = labels != 255
    return float(tf.reduce_mean(tf.cast(pred[valid] == labels[valid], tf.float32)))


def fit_camvid(backbone_weights, *, steps=40, num_train=16, size=(88, 120), seed=0):
    """Trains DeepLabv3+ MobileNetV2 a0.35 on `num_train` CamVid frames.

    Args:
      backbone_weights: the ImageNet file, or None for random init.
      steps: Adam steps (batch 8, lr 1e-3).
      num_train: train frames, spread evenly over train.txt.
      size: (height, width) of every frame.
      seed: initialisation and shuffling seed.

    Returns:
      Pixel accuracy on the 101 val frames (void excluded).
    """
    train_ids = _camvid_ids("train")
    train_ids = train_ids[:: len(train_ids) // num_train][:num_train]
    x, y = _camvid("train", train_ids, size)
    val_x, val_y = _camvid("val", _camvid_ids("val"), size)
    keras.utils.set_random_seed(seed)
    model = models.build_model(
        "deeplabv3plus",
        11,
        backbone="mobilenetv2",
        backbone_width=0.35,
        decoder_filters=64,
        backbone_weights=backbone_weights,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
    )
    batch = 8
    model.fit(x, y, batch_size=batch, epochs=steps * batch // num_train, verbose=0)
    return _pixel_accuracy(model, val_x, val_y)


@pytest.mark.slow
class PretrainedLearnsFasterTest(tf.test.TestCase):
    def test_pretrained_beats_random_on_camvid(self):
        """40 steps on 16 frames: ImageNet features are worth tens of points."""
        path = _weights(self, MOBILENET_V2_035)
        if not os.path.isdir(CAMVID_DIR):
            self.skipTest(f"{CAMVID_DIR} is absent.")
        pretrained = fit_camvid(path)
        random = fit_camvid(None)
        print(f"CamVid val pixel accuracy: pretrained {pretrained:.3f}, random {random:.3f}")
        self.assertGreater(pretrained, random + 0.1)
        self.assertGreater(pretrained, 0.55)


if __name__ == "__main__":
    tf.test.main()
