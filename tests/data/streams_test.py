"""Tests of uda_tf/data/streams.py: crops (goldens, alignment), streams, seeds, eval."""

import dataclasses
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from augment import color, mix, seeds
from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes, preprocess, sources, streams

_ROOT = None
_MEAN = np.array(common.MEAN_RGB_UINT8, np.uint8)
_IDENTITY = np.array([1, 0, 0, 0, 1, 0, 0, 0], np.float32)


def setUpModule():
    global _ROOT
    _ROOT = tempfile.mkdtemp()
    fake_cityscapes.generate(
        os.path.join(_ROOT, "cs"), num_train=5, num_val=3, num_extra=2, height=64, width=128
    )
    cfg = config_lib.DataConfig(data_dir=os.path.join(_ROOT, "cs"))
    preprocess.preprocess_sup(cfg, os.path.join(_ROOT, "rec"))


def tearDownModule():
    shutil.rmtree(_ROOT, ignore_errors=True)


def _cfg(**kwargs) -> config_lib.DataConfig:
    defaults = {
        "data_dir": os.path.join(_ROOT, "cs"), "train_batch_size": 2, "eval_batch_size": 2,
        "crop_height": 48, "crop_width": 80, "shuffle_buffer": 8,
    }  # fmt: skip
    return config_lib.DataConfig(**{**defaults, **kwargs})


def _params(src_offset, src_size, out_size, dst_offset=(0, 0), flip=False):
    return {
        "src_offset": tf.constant(src_offset, tf.int32),
        "src_size": tf.constant(src_size, tf.int32),
        "out_size": tf.constant(out_size, tf.int32),
        "dst_offset": tf.constant(dst_offset, tf.int32),
        "flip": tf.constant(flip),
    }


def _fake_distort(image, mask, *, seed, cfg):
    """A cheap stand-in for RandAugment: invert, move by one pixel, report it."""
    del seed, cfg
    aug = tf.roll(255 - image, shift=1, axis=1)
    if mask is not None:
        mask = tf.roll(mask, shift=1, axis=1)
    return aug, mask, tf.constant([1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def _batches(ds: tf.data.Dataset, n: int) -> list[dict]:
    return [b for b, _ in zip(ds.as_numpy_iterator(), range(n))]


class CropTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)  # Test data only.
        self.image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)

    @parameterized.parameters("bilinear", "nearest")
    def test_scale_one_is_a_slice_and_flip_reverses(self, interpolation):
        params = _params((2, 3), (12, 16), (12, 16))
        out = streams.apply_crop(
            self.image, params, crop_size=(12, 16), interpolation=interpolation, fill=0
        )
        self.assertAllEqual(out, self.image[2:14, 3:19])
        params["flip"] = tf.constant(True)
        out = streams.apply_crop(
            self.image, params, crop_size=(12, 16), interpolation=interpolation, fill=0
        )
        self.assertAllEqual(out, self.image[2:14, 3:19][:, ::-1])

    def test_nearest_upscale_by_two_repeats_pixels(self):
        out = streams.apply_crop(
            self.image, _params((1, 2), (5, 6), (10, 12)), crop_size=(10, 12),
            interpolation="nearest", fill=0,
        )  # fmt: skip
        window = self.image[1:6, 2:8]
        self.assertAllEqual(out, window.repeat(2, 0).repeat(2, 1))

    def test_bilinear_downscale_by_two_averages_blocks(self):
        out = streams.apply_crop(
            self.image, _params((0, 0), (20, 30), (10, 15)), crop_size=(10, 15),
            interpolation="bilinear", fill=0,
        )  # fmt: skip
        blocks = self.image.astype(np.float64).reshape(10, 2, 15, 2, 3).mean((1, 3))
        self.assertAllEqual(out, np.floor(blocks + 0.5).astype(np.uint8))

    def test_padding_is_filled_and_reported(self):
        # The whole image scaled to 10x15, placed at (3, 4) in a 16x24 crop.
        params = _params((0, 0), (20, 30), (10, 15), dst_offset=(3, 4), flip=True)
        out = streams.apply_crop(
            self.image, params, crop_size=(16, 24), interpolation="bilinear", fill=(1, 2, 3)
        ).numpy()
        valid = streams.crop_valid(params, (16, 24)).numpy()
        expected_valid = np.zeros((16, 24), bool)
        expected_valid[3:13, 4:19] = True
        self.assertAllEqual(valid, expected_valid[:, ::-1])
        self.assertAllEqual(out[~valid], np.tile([1, 2, 3], ((~valid).sum(), 1)))
        resized = tf.cast(tf.image.resize(self.image, (10, 15)) + 0.5, tf.uint8)
        self.assertAllEqual(out[:, ::-1][3:13, 4:19], resized)

    @parameterized.parameters(range(4))
    def test_matches_tf_image_resize_of_the_window(self, seed):
        crop = (16, 24)
        params = streams.sample_crop_params(
            tf.constant([20, 30]), seed=tf.constant([seed, 1]), crop_size=crop,
            min_scale=0.4, max_scale=2.0,
        )  # fmt: skip
        p = {k: v.numpy() for k, v in params.items()}
        (y, x), (h, w), (dy, dx) = p["src_offset"], p["src_size"], p["dst_offset"]
        window = self.image[y : y + h, x : x + w]
        for method in ("bilinear", "nearest"):
            out = streams.apply_crop(
                self.image, params, crop_size=crop, interpolation=method, fill=0
            )
            ref = tf.image.resize(window, p["out_size"], method=method).numpy()
            canvas = np.zeros(crop + (3,), np.uint8)
            oh, ow = p["out_size"]
            canvas[dy : dy + oh, dx : dx + ow] = (
                np.floor(ref + 0.5) if method == "bilinear" else ref
            )
            self.assertAllEqual(out, canvas[:, ::-1] if p["flip"] else canvas)

    def test_sample_crop_params_ranges(self):
        size, crop = (64, 128), (48, 80)
        scales = []
        for i in range(40):
            p = streams.sample_crop_params(
                tf.constant(size), seed=tf.constant([i, 7]), crop_size=crop,
                min_scale=0.5, max_scale=2.0,
            )  # fmt: skip
            p = {k: v.numpy() for k, v in p.items()}
            for a in range(2):
                self.assertBetween(p["src_offset"][a], 0, size[a] - p["src_size"][a])
                self.assertBetween(p["dst_offset"][a], 0, crop[a] - p["out_size"][a])
                self.assertLessEqual(p["out_size"][a], crop[a])
            scales.append(p["out_size"][1] / p["src_size"][1])
        self.assertBetween(min(scales), 0.45, 0.7)
        self.assertBetween(max(scales), 1.6, 2.1)

    def test_same_seed_same_params_other_seed_differs(self):
        def draw(s):
            p = streams.sample_crop_params(
                tf.constant([64, 128]), seed=tf.constant(s), crop_size=(48, 80),
                min_scale=0.5, max_scale=2.0,
            )  # fmt: skip
            return tuple(tuple(np.ravel(v.numpy())) for v in p.values())

        self.assertEqual(draw([1, 2]), draw([1, 2]))
        self.assertGreater(len({draw([i, 2]) for i in range(10)}), 5)

    @parameterized.parameters(False, True)
    def test_labeled_crop_keeps_image_and_mask_aligned(self, raw_labels):
        cfg = _cfg(min_scale=0.3, max_scale=2.5)
        rng = np.random.default_rng(1)  # Test data only.
        mask = rng.integers(0, 19, (64, 128), dtype=np.uint8)
        mask[:, :5] = 255
        image = np.stack([(mask.astype(np.int32) * 10 % 256).astype(np.uint8), mask, mask], -1)
        table = None
        stored = mask
        if raw_labels:  # Stored values 100 + id, mapped by the table after cropping.
            table = [255] * 256
            for v in range(19):
                table[100 + v] = v
            stored = np.where(mask == 255, 255, mask + 100).astype(np.uint8)
        num_padded = 0
        for i in range(12):
            out = streams.labeled_crop(
                {common.IMAGE: image, common.MASK: stored}, seed=tf.constant([i, 3]), cfg=cfg,
                label_table=table, image_interpolation="nearest",
            )  # fmt: skip
            img, m = out[common.IMAGE].numpy(), out[common.MASK].numpy()
            self.assertEqual(m.dtype, np.uint8)
            self.assertEqual(m.shape, (48, 80))
            labeled = m != 255
            self.assertAllEqual(img[..., 0][labeled], (m[labeled].astype(np.int32) * 10) % 256)
            self.assertContainsSubset(np.unique(m), set(np.unique(mask)) | {255})
            num_padded += int(np.all(img == _MEAN, -1).any())
        self.assertGreater(num_padded, 0)  # Some crops were padded (scale down to 0.3).


class StreamTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.real = streams.randaugment_distort
        streams.randaugment_distort = _fake_distort

    def tearDown(self):
        streams.randaugment_distort = self.real
        super().tearDown()

    def test_supervised_only_stream(self):
        batch = _batches(streams.train_dataset(_cfg()), 1)[0]
        self.assertCountEqual(batch.keys(), [common.IMAGE, common.MASK])
        self.assertEqual(batch[common.IMAGE].shape, (2, 48, 80, 3))
        self.assertEqual(batch[common.IMAGE].dtype, np.uint8)
        self.assertEqual(batch[common.MASK].shape, (2, 48, 80))
        self.assertContainsSubset(np.unique(batch[common.MASK]), list(range(19)) + [255])

    def test_uda_stream(self):
        batch = _batches(streams.train_dataset(_cfg(unsup_ratio=2, min_scale=0.3)), 1)[0]
        self.assertCountEqual(
            batch.keys(),
            [common.IMAGE, common.MASK, common.ORI_IMAGE, common.ORI_VALID, common.AUG_IMAGE,
             common.AUG_TRANSFORM],
        )  # fmt: skip
        self.assertEqual(batch[common.ORI_IMAGE].shape, (4, 48, 80, 3))
        self.assertEqual(batch[common.ORI_VALID].shape, (4, 48, 80))
        self.assertEqual(batch[common.ORI_VALID].dtype, np.uint8)
        self.assertEqual(batch[common.AUG_TRANSFORM].shape, (4, 8))
        self.assertEqual(batch[common.AUG_TRANSFORM].dtype, np.float32)
        valid = batch[common.ORI_VALID].astype(bool)
        self.assertContainsSubset(np.unique(batch[common.ORI_VALID]), [0, 1])
        self.assertAllEqual(batch[common.ORI_IMAGE][~valid], np.tile(_MEAN, ((~valid).sum(), 1)))
        # The aug view is the seam's output on the ori view.
        expected = np.roll(255 - batch[common.ORI_IMAGE], 1, axis=2)
        self.assertAllEqual(batch[common.AUG_IMAGE], expected)
        self.assertAllEqual(batch[common.AUG_TRANSFORM][:, 2], [-1.0] * 4)

    def test_same_seed_same_batches_other_seed_differs(self):
        cfg = _cfg(unsup_ratio=1)
        a = _batches(streams.train_dataset(cfg), 3)
        b = _batches(streams.train_dataset(cfg), 3)
        c = _batches(streams.train_dataset(dataclasses.replace(cfg, seed=1)), 3)
        for x, y in zip(a, b):
            for key in x:
                self.assertAllEqual(x[key], y[key])
        self.assertNotAllEqual(a[0][common.IMAGE], c[0][common.IMAGE])
        self.assertNotAllEqual(a[2][common.ORI_IMAGE], c[2][common.ORI_IMAGE])
        # Steps differ from one another (fresh draws per example).
        self.assertNotAllEqual(a[0][common.ORI_IMAGE], a[1][common.ORI_IMAGE])

    def test_eager_and_tf_data_agree(self):
        cfg = _cfg()
        source = sources.labeled_source(cfg, "train")
        element = next(iter(source.elements()))
        seed = tf.constant([4, 5], tf.int64)
        eager = streams.labeled_crop(element, seed=seed, cfg=cfg)
        mapped = next(
            iter(source.elements().map(lambda e: streams.labeled_crop(e, seed=seed, cfg=cfg)))
        )
        for key in eager:
            self.assertAllEqual(eager[key], mapped[key])

    def test_sup_randaugment_moves_image_and_mask_together(self):
        cfg = _cfg(sup_randaugment=True)
        element = next(iter(sources.labeled_source(cfg, "train").elements()))
        seed = tf.constant([4, 5], tf.int64)
        plain = streams.labeled_crop(
            element, seed=seed, cfg=dataclasses.replace(cfg, sup_randaugment=False)
        )
        augmented = streams.labeled_crop(element, seed=seed, cfg=cfg)
        self.assertAllEqual(augmented[common.MASK], np.roll(plain[common.MASK], 1, axis=1))
        self.assertAllEqual(augmented[common.IMAGE], np.roll(255 - plain[common.IMAGE], 1, axis=1))

    def test_tfrecord_stream_equals_folder_stream(self):
        a = _batches(streams.train_dataset(_cfg(sup_size=3)), 2)
        b = _batches(
            streams.train_dataset(_cfg(sup_size=3, data_dir=os.path.join(_ROOT, "rec"))), 2
        )
        for x, y in zip(a, b):
            for key in x:
                self.assertAllEqual(x[key], y[key])

    def test_eval_dataset(self):
        cfg = _cfg()
        batches = list(streams.eval_dataset(cfg).as_numpy_iterator())
        self.assertEqual([len(b[common.FILENAME]) for b in batches], [2, 1])
        self.assertEqual(batches[0][common.IMAGE].shape, (2, 64, 128, 3))
        self.assertEqual(batches[0][common.MASK].shape, (2, 64, 128))
        names = [n.decode() for b in batches for n in b[common.FILENAME]]
        self.assertEqual(names, sorted(names))
        elements = list(sources.labeled_source(cfg, "val").elements().as_numpy_iterator())
        self.assertAllEqual(batches[0][common.MASK][1], elements[1][common.MASK])
        again = list(streams.eval_dataset(cfg).as_numpy_iterator())
        self.assertAllEqual(again[1][common.IMAGE], batches[1][common.IMAGE])

    def test_bad_flags_fail_before_training(self):
        with self.assertRaisesRegex(ValueError, "--sup_size=9 is larger than the 5"):
            streams.train_dataset(_cfg(sup_size=9))
        with self.assertRaisesRegex(ValueError, "--num_classes=11"):
            streams.train_dataset(_cfg(num_classes=11))
        with self.assertRaisesRegex(ValueError, "No TFRecord set \\['unsup'\\]"):
            streams.train_dataset(_cfg(unsup_ratio=1, data_dir=os.path.join(_ROOT, "rec")))


class RandAugmentTest(tf.test.TestCase):
    @pytest.mark.slow  # Tracing the 15-op policy takes ~10 s on 2 cores.
    def test_the_real_aug_view(self):
        cfg = _cfg(unsup_ratio=1, train_batch_size=1)
        batch = _batches(streams.train_dataset(cfg), 1)[0]
        self.assertEqual(batch[common.AUG_IMAGE].shape, (1, 48, 80, 3))
        self.assertEqual(batch[common.AUG_IMAGE].dtype, np.uint8)
        self.assertEqual(batch[common.AUG_TRANSFORM].shape, (1, 8))


class StrongViewTest(tf.test.TestCase):
    """--aug_policy=color and --unsup_mix=cutmix, wired into the unlabeled stream."""

    def test_color_view_is_the_examples_colour_view(self):
        cfg = _cfg(unsup_ratio=1, aug_policy="color")
        batch = _batches(streams.train_dataset(cfg), 1)[0]
        self.assertAllEqual(batch[common.AUG_TRANSFORM], np.tile(_IDENTITY, (2, 1)))
        for i in range(2):
            seed = seeds.example_seed(cfg.seed, common.UNSUP_STREAM, tf.constant(i, tf.int64))
            _, aug_seed = seeds.split_seed(seed, 2)
            expected, _, _ = color.color_view(batch[common.ORI_IMAGE][i], seed=aug_seed)
            self.assertAllEqual(batch[common.AUG_IMAGE][i], expected)

    def test_color_hue_flag_sets_the_views_hue_range(self):
        def views(hue):
            cfg = _cfg(unsup_ratio=1, aug_policy="color", aug_color_hue=hue)
            return cfg, _batches(streams.train_dataset(cfg), 1)[0]

        cfg, batch = views(0.0)
        _, default = views(color.HUE)
        self.assertAllEqual(batch[common.ORI_IMAGE], default[common.ORI_IMAGE])
        for i in range(2):
            seed = seeds.example_seed(cfg.seed, common.UNSUP_STREAM, tf.constant(i, tf.int64))
            _, aug_seed = seeds.split_seed(seed, 2)
            expected, _, _ = color.color_view(batch[common.ORI_IMAGE][i], seed=aug_seed, hue=0.0)
            self.assertAllEqual(batch[common.AUG_IMAGE][i], expected)
        # Seed 0's views: the jitter fires on one of the two, so its hue shift shows.
        self.assertNotAllEqual(batch[common.AUG_IMAGE], default[common.AUG_IMAGE])

    def test_color_max_sigma_flag_sets_the_views_blur_range(self):
        def views(max_sigma):
            cfg = _cfg(unsup_ratio=1, aug_policy="color", aug_color_max_sigma=max_sigma)
            return cfg, _batches(streams.train_dataset(cfg), 1)[0]

        cfg, batch = views(0.1)
        _, default = views(color.SIGMA_RANGE[1])
        self.assertAllEqual(batch[common.ORI_IMAGE], default[common.ORI_IMAGE])
        blurred = []
        for i in range(2):
            seed = seeds.example_seed(cfg.seed, common.UNSUP_STREAM, tf.constant(i, tf.int64))
            _, aug_seed = seeds.split_seed(seed, 2)
            expected, _, _ = color.color_view(
                batch[common.ORI_IMAGE][i], seed=aug_seed, sigma_range=(0.1, 0.1)
            )
            self.assertAllEqual(batch[common.AUG_IMAGE][i], expected)
            color_seed, _ = seeds.split_seed(aug_seed, 2)
            blurred.append(bool(color.sample_color_params(seed=color_seed)["blur"]))
        # The blur fires on at least one of seed 0's two views, so its sigma shows there.
        self.assertIn(True, blurred)
        self.assertNotAllEqual(batch[common.AUG_IMAGE], default[common.AUG_IMAGE])

    def test_cutmix_mixes_each_batch_with_its_step_seed(self):
        real = streams.randaugment_distort
        streams.randaugment_distort = _fake_distort
        try:
            plain = _batches(streams.train_dataset(_cfg(unsup_ratio=2)), 3)
            mixed = _batches(streams.train_dataset(_cfg(unsup_ratio=2, unsup_mix="cutmix")), 3)
            resumed = _batches(
                streams.train_dataset(_cfg(unsup_ratio=2, unsup_mix="cutmix"), start_step=2), 1
            )
        finally:
            streams.randaugment_distort = real
        for step, (a, b) in enumerate(zip(plain, mixed)):
            self.assertAllEqual(a[common.ORI_IMAGE], b[common.ORI_IMAGE])
            seed = seeds.example_seed(0, common.MIX_STREAM, tf.constant(step, tf.int64))
            expected = mix.cutmix_batch(a, seed=seed)
            for key in (common.AUG_IMAGE, common.MIX_MASK, common.MIX_PARTNER):
                self.assertAllEqual(b[key], expected[key])
            # Inside the box the pixel is the partner's aug view, outside its own.
            box = b[common.MIX_MASK].astype(bool)[..., None]
            partner_aug = a[common.AUG_IMAGE][b[common.MIX_PARTNER]]
            self.assertAllEqual(
                b[common.AUG_IMAGE], np.where(box, partner_aug, a[common.AUG_IMAGE])
            )
        self.assertGreater(sum(b[common.MIX_MASK].sum() for b in mixed), 0)
        for key in mixed[2]:
            self.assertAllEqual(resumed[0][key], mixed[2][key])


class ResizeElementTest(tf.test.TestCase):
    def test_half_resolution_keeps_labels_and_alignment(self):
        # Blocks of 2x2 pixels: halving must keep each block's label exactly;
        # a flat colour stays that colour (the image is filtered, not shifted).
        labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 7
        mask = np.kron(labels, np.ones((2, 2), np.uint8))  # [6, 8]
        image = np.full((6, 8, 3), (200, 30, 7), np.uint8)
        out = streams.resize_element({common.IMAGE: image, common.MASK: mask}, 0.5)
        self.assertEqual(out[common.MASK].dtype, tf.uint8)
        self.assertAllEqual(out[common.MASK], labels)
        self.assertAllEqual(out[common.IMAGE], np.full((3, 4, 3), (200, 30, 7), np.uint8))

    def test_factor_one_is_the_identity(self):
        element = {common.IMAGE: np.zeros((5, 7, 3), np.uint8)}
        self.assertIs(streams.resize_element(element, 1.0), element)


if __name__ == "__main__":
    tf.test.main()
