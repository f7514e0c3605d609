"""Tests of augment/mix.py (CutMix between unlabeled images) and of the mixed targets."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from augment import joint, mix, randaugment, seeds
from uda_tf import common, losses

FILL = -1.0  # warped-in pixels of the label-carrying images


def _seed(i):
    return seeds.example_seed(5, common.MIX_STREAM, i)


@tf.function
def _sample(seed, n, h, w, prob):
    return mix.sample_cutmix_params(seed=seed, batch_size=n, height=h, width=w, prob=prob)


def _params(i, n=8, h=64, w=96, prob=mix.CUTMIX_PROB):
    """The params of seed i; traced once per shape (the statistical tests draw many)."""
    if not 0.0 <= prob <= 1.0:  # the eager call raises
        return mix.sample_cutmix_params(seed=_seed(i), batch_size=n, height=h, width=w, prob=prob)
    return _sample(_seed(i), tf.constant(n), tf.constant(h), tf.constant(w), prob)


def _numpy(params):
    return {k: v.numpy() for k, v in params.items()}


class SampleCutmixParamsTest(tf.test.TestCase, parameterized.TestCase):
    def test_same_seed_same_params_and_different_seeds_differ(self):
        draws = []
        for i in range(8):
            a, b = _numpy(_params(i)), _numpy(_params(i))
            for key in a:
                self.assertAllEqual(a[key], b[key], msg=key)
            draws.append(a)
        for key in ("partner", "boxes", "apply"):
            distinct = {draw[key].tobytes() for draw in draws}
            self.assertGreaterEqual(len(distinct), 6, key)

    @parameterized.parameters((64, 96), (128, 256), (33, 200), (200, 33), (512, 1024))
    def test_box_area_aspect_and_frame(self, height, width):
        for i in range(30):
            p = _numpy(_params(i, h=height, w=width))
            self.assertTrue(np.all((p["area_fraction"] >= 0.02) & (p["area_fraction"] <= 0.4)))
            self.assertTrue(np.all((p["aspect_ratio"] >= 0.3) & (p["aspect_ratio"] <= 1 / 0.3)))
            y0, x0, y1, x1 = p["boxes"].T
            self.assertTrue(np.all((0 <= y0) & (y0 < y1) & (y1 <= height)))
            self.assertTrue(np.all((0 <= x0) & (x0 < x1) & (x1 <= width)))
            # The box is the drawn area up to rounding its sides to whole pixels.
            box_h, box_w = y1 - y0, x1 - x0
            area = p["area_fraction"] * height * width
            rounding = 0.5 * (box_h + box_w) + 1.0  # pixels
            self.assertTrue(np.all(np.abs(box_h * box_w - area) <= rounding))
            mask = mix.cutmix_mask(_params(i, h=height, w=width), height, width).numpy()
            fraction = mask.reshape(len(mask), -1).mean(axis=1)
            on = p["apply"]
            self.assertAllEqual(fraction[~on], np.zeros(np.sum(~on)))
            rounding /= height * width
            self.assertTrue(np.all(fraction[on] >= 0.02 - rounding[on]))
            self.assertTrue(np.all(fraction[on] <= 0.40 + rounding[on]))

    def test_about_half_of_the_images_are_mixed(self):
        applied = np.concatenate([_params(i)["apply"].numpy() for i in range(250)])
        self.assertLen(applied, 2000)
        self.assertBetween(applied.mean(), 0.45, 0.55)  # 0.5 +- 4.5 sigma

    def test_area_and_position_cover_their_ranges(self):
        p = [_numpy(_params(i, h=128, w=128)) for i in range(100)]
        area = np.concatenate([q["area_fraction"] for q in p])
        self.assertBetween(area.mean(), 0.19, 0.23)  # uniform on [0.02, 0.4]: 0.21
        self.assertLess(area.min(), 0.03)
        self.assertGreater(area.max(), 0.39)
        boxes = np.concatenate([q["boxes"] for q in p])
        self.assertEqual(boxes[:, 0].min(), 0)
        self.assertEqual(boxes[:, 3].max(), 128)

    @parameterized.parameters(2, 3, 8)
    def test_partners_are_a_permutation_without_fixed_points(self, n):
        for i in range(20):
            partner = _params(i, n=n)["partner"].numpy()
            self.assertEqual(partner.dtype, np.int32)
            self.assertCountEqual(partner, range(n))
            self.assertFalse(np.any(partner == np.arange(n)))

    def test_a_single_image_is_its_own_partner(self):
        self.assertAllEqual(_params(0, n=1)["partner"], [0])

    def test_prob_zero_and_one(self):
        self.assertFalse(np.any(_params(0, prob=0.0)["apply"].numpy()))
        self.assertTrue(np.all(_params(0, prob=1.0)["apply"].numpy()))
        with self.assertRaisesRegex(ValueError, "prob=1.5"):
            _params(0, prob=1.5)

    def test_eager_tf_function_and_tf_data_agree(self):
        batch = {common.AUG_IMAGE: _images(6, 24, 32), common.ORI_IMAGE: _images(6, 24, 32)}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, None, 3], tf.uint8),
                tf.TensorSpec([2], tf.int64),
            ]
        )
        def graph_mix(aug, seed):
            return mix.cutmix_batch({common.AUG_IMAGE: aug}, seed=seed)

        ds = tf.data.Dataset.range(4).map(
            lambda i: mix.cutmix_batch(batch, seed=_seed(i)), num_parallel_calls=2
        )
        for i, from_data in enumerate(ds):
            eager = mix.cutmix_batch(batch, seed=_seed(i))
            graph = graph_mix(batch[common.AUG_IMAGE], _seed(i))
            for key in graph:
                self.assertAllEqual(graph[key], eager[key], msg=key)
                self.assertAllEqual(from_data[key], eager[key], msg=key)
            self.assertAllEqual(from_data[common.ORI_IMAGE], batch[common.ORI_IMAGE])


def _images(n, h, w, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8))


class ApplyCutmixTest(tf.test.TestCase):
    def test_the_box_shows_the_partner_and_the_rest_is_kept(self):
        aug = _images(5, 20, 28)
        batch = {common.AUG_IMAGE: aug, common.ORI_IMAGE: _images(5, 20, 28, seed=1)}
        params = mix.sample_cutmix_params(
            seed=_seed(3), batch_size=5, height=20, width=28, prob=0.7
        )
        out = mix.apply_cutmix(batch, params)
        mask = out[common.MIX_MASK].numpy().astype(bool)
        partner = out[common.MIX_PARTNER].numpy()
        self.assertEqual(out[common.MIX_MASK].dtype, tf.uint8)
        self.assertEqual(out[common.MIX_PARTNER].dtype, tf.int32)
        self.assertEqual(out[common.AUG_IMAGE].dtype, tf.uint8)
        self.assertAllEqual(out[common.ORI_IMAGE], batch[common.ORI_IMAGE])
        self.assertTrue(mask.any() and not mask.all())
        want = np.where(mask[..., None], aug.numpy()[partner], aug.numpy())
        self.assertAllEqual(out[common.AUG_IMAGE], want)
        for i, on in enumerate(params["apply"].numpy()):
            y0, x0, y1, x1 = params["boxes"][i].numpy()
            expected = np.zeros((20, 28), bool)
            expected[y0:y1, x0:x1] = on
            self.assertAllEqual(mask[i], expected)


class MixedTargetAlignmentTest(tf.test.TestCase, parameterized.TestCase):
    """Label-carrying images: channels (image index + 1, ori row, ori column).

    Each ori image is warped by a RandAugment geometric transform into its aug
    view (fill -1), the aug views are CutMixed, and the targets (the same
    channels, as per-pixel maps) go through the loss's own warp and mix. Every
    valid pixel of the mixed view must then carry the target of the image and
    scene point it shows.
    """

    N, H, W = 4, 24, 32

    def _transforms(self, h=H, w=W):
        rt = randaugment.geometric_transform
        return tf.stack(
            [
                joint.compose_transforms(rt("Rotate", 9, 1.0, h, w), rt("ShearX", 5, -1.0, h, w)),
                rt("TranslateX", 7, 1.0, h, w),
                joint.compose_transforms(rt("ShearY", 8, 1.0, h, w), rt("Rotate", 6, -1.0, h, w)),
                rt("TranslateY", 9, -1.0, h, w),
            ]
        )

    def _label_images(self, h=H, w=W):
        n = self.N
        index, rows, cols = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
        ori = np.stack([index + 1.0, rows, cols], axis=-1).astype(np.float32)  # [N, H, W, 3]
        ori_valid = np.ones((n, h, w), np.uint8)
        ori_valid[2, :5] = 0  # padding of image 2: its pixels are not valid targets
        ori_valid[0, :, -3:] = 0
        return ori, ori_valid

    @parameterized.parameters(1.0, 0.5)
    def test_every_valid_pixel_is_compared_with_its_own_source(self, prob):
        ori, ori_valid = self._label_images()
        transforms = self._transforms()
        # The aug views, as the pipeline makes them: warp, fill out-of-frame pixels.
        shown_valid = np.where(ori_valid[..., None] == 1, ori, -2.0).astype(np.float32)
        aug = joint.warp_tensor(
            tf.constant(shown_valid), transforms, interpolation="nearest", fill_value=FILL
        )
        seed = _seed(11) if prob == 1.0 else _seed(2)
        mixed = mix.cutmix_batch({common.AUG_IMAGE: aug}, seed=seed, prob=prob)
        mixed_aug = mixed[common.AUG_IMAGE].numpy()
        # The targets: the same label maps, through the loss's warp and mix.
        confidence = np.broadcast_to(np.arange(1, self.N + 1)[:, None, None] / 10.0, ori.shape[:3])
        stacked = tf.concat([ori, tf.constant(confidence, tf.float32)[..., None]], -1)
        warped, warp_valid = losses.warp_to_aug(
            stacked, transforms, ori_valid=ori_valid, interpolation="nearest"
        )
        target, target_conf, target_valid = losses.mix_targets(
            target_prob=warped[..., :3],
            confidence=warped[..., 3],
            valid=warp_valid,
            mix_mask=mixed[common.MIX_MASK],
            mix_partner=mixed[common.MIX_PARTNER],
        )
        target, target_conf, target_valid = (
            target.numpy(),
            target_conf.numpy(),
            target_valid.numpy(),
        )
        # Valid exactly where the mixed view shows a valid scene pixel.
        self.assertAllEqual(target_valid, mixed_aug[..., 0] >= 1.0)
        # There, the target is that of the image and the place the pixel shows.
        self.assertAllEqual(target[target_valid], mixed_aug[target_valid])
        source = mixed_aug[..., 0][target_valid] - 1.0
        self.assertAllClose(target_conf[target_valid], (source + 1.0) / 10.0)
        # Inside the box, the mixed target is the partner's warped one.
        box = mixed[common.MIX_MASK].numpy().astype(bool)
        partner = mixed[common.MIX_PARTNER].numpy()
        own, theirs = warped.numpy()[..., :3], warped.numpy()[partner][..., :3]
        self.assertAllEqual(target[box], theirs[box])
        self.assertAllEqual(target[~box], own[~box])
        # The check is not vacuous: boxes, fill and partner pixels all occur.
        self.assertGreater(box.sum(), 100)
        self.assertGreater((~target_valid).sum(), 100)
        own_index = np.broadcast_to(np.arange(self.N)[:, None, None], target_valid.shape)
        self.assertGreater(np.sum(source != own_index[target_valid]), 100)

    def test_consistency_loss_mixes_targets_after_warping(self):
        """The loss compares each valid pixel with the target of its own image."""
        h, w = 12, 16
        ori, ori_valid = self._label_images(h, w)
        transforms = self._transforms(h, w)
        num_classes = self.N * h * w  # one class per (image, ori pixel)
        ids = (ori[..., 0] - 1) * h * w + ori[..., 1] * w + ori[..., 2]
        ori_logits = tf.one_hot(ids.astype(np.int32), num_classes) * 30.0
        aug_ids = joint.warp_tensor(
            tf.constant(ids[..., None], tf.float32), transforms, fill_value=FILL
        )
        mixed = mix.cutmix_batch({common.AUG_IMAGE: aug_ids}, seed=_seed(11), prob=1.0)
        shown = tf.cast(mixed[common.AUG_IMAGE][..., 0], tf.int32)  # [N, H, W], -1 = fill
        # aug logits that predict exactly the id each mixed pixel shows: the loss is ~0
        aug_logits = tf.one_hot(tf.maximum(shown, 0), num_classes) * 30.0
        kwargs = {
            "ori_logits": ori_logits,
            "transforms": transforms,
            "ori_valid": ori_valid,
            "mix_mask": mixed[common.MIX_MASK],
            "mix_partner": mixed[common.MIX_PARTNER],
        }
        for uda_loss in ("kl", "ce"):
            out = losses.consistency_loss(aug_logits=aug_logits, uda_loss=uda_loss, **kwargs)
            self.assertLess(float(out["loss"]), 1e-5, uda_loss)
            # Without mixing the targets, the box pixels disagree.
            unmixed = {k: v for k, v in kwargs.items() if not k.startswith("mix")}
            wrong = losses.consistency_loss(aug_logits=aug_logits, uda_loss=uda_loss, **unmixed)
            self.assertGreater(float(wrong["loss"]), 1.0, uda_loss)


if __name__ == "__main__":
    tf.test.main()
