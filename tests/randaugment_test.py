"""Tests of augment/randaugment.py: joint alignment, sampling, seeds, graph mode."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from augment import joint, randaugment, seeds
from uda_tf import common

MEAN = np.array(common.MEAN_RGB_UINT8, np.uint8)
IDENTITY = joint.IDENTITY_TRANSFORM


def _labelled(height=24, width=40):
    """(image, mask): mask has 19 classes and some ignore; image channel 0 = mask * 10."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    mask = ((x // 5 + 3 * (y // 4)) % 19).astype(np.uint8)
    mask[rng.random((height, width)) < 0.05] = 255
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    image[..., 0] = np.where(mask == 255, 7, mask * 10)
    return image, mask


def _check_alignment(test, image, mask, mask_in, transform):
    image, mask = np.asarray(image), np.asarray(mask)
    valid = mask != 255
    test.assertAllEqual(image[..., 0][valid], mask[valid].astype(np.int32) * 10)
    test.assertEqual(mask.dtype, mask_in.dtype)
    test.assertContainsSubset(set(np.unique(mask)), set(np.unique(mask_in)) | {255})
    # The returned transform reproduces the mask exactly.
    test.assertAllEqual(joint.warp_mask(tf.constant(mask_in), transform), mask)


def _seed(i):
    return tf.constant([i, 17], tf.int64)


class GeometricAlignmentTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(name=randaugment.GEOMETRIC_OPS, sign=(-1, 1))
    def test_every_level_keeps_image_and_mask_aligned(self, name, sign):
        image, mask = _labelled()
        for level in range(1, 10):
            out, out_mask, transform = randaugment.apply_op(
                image, mask, name=name, level=level, sign=sign, interpolation="nearest"
            )
            self.assertNotAllClose(transform, IDENTITY)
            _check_alignment(self, out, out_mask, mask, transform)

    def test_random_geometric_distort_is_aligned(self):
        image, mask = _labelled()
        moved = 0
        for i in range(12):
            out, out_mask, transform = randaugment.distort(
                image, mask, seed=_seed(i), ops="geometric", cutout=False, interpolation="nearest"
            )
            _check_alignment(self, out, out_mask, mask, transform)
            moved += int(np.any(transform.numpy() != IDENTITY))
        self.assertGreater(moved, 3)

    def test_cutout_ignore_keeps_alignment(self):
        image, mask = _labelled()
        for i in range(6):
            out, out_mask, _ = randaugment.distort(
                image, mask, seed=_seed(i), ops="geometric", interpolation="nearest",
                cutout_ignore=True,
            )  # fmt: skip
            valid = out_mask.numpy() != 255
            self.assertAllEqual(out.numpy()[..., 0][valid], out_mask.numpy()[valid] * 10)


class DistortTest(tf.test.TestCase, parameterized.TestCase):
    def test_mask_is_the_warp_of_the_input_by_the_transform(self):
        image, mask = _labelled()
        for i in range(16):
            out, out_mask, transform = randaugment.distort(image, mask, seed=_seed(i))
            self.assertEqual(out.dtype, tf.uint8)
            self.assertEqual(out.shape, image.shape)
            self.assertAllEqual(out_mask, joint.warp_mask(tf.constant(mask), transform))

    def test_mask_fill_is_configurable(self):
        image, mask = _labelled()
        for i in range(8):
            _, out_mask, transform = randaugment.distort(
                image, mask, seed=_seed(i), ops="geometric", mask_fill=250
            )
            self.assertAllEqual(out_mask, joint.warp_mask(tf.constant(mask), transform, fill=250))
            self.assertContainsSubset(set(np.unique(out_mask)), set(np.unique(mask)) | {250})

    def test_photometric_policy_never_moves_the_mask(self):
        image, mask = _labelled()
        changed = 0
        for i in range(16):
            out, out_mask, transform = randaugment.distort(
                image, mask[..., None], seed=_seed(i), ops="photometric", cutout=False
            )
            self.assertAllEqual(out_mask, mask[..., None])  # bit-identical, shape kept.
            self.assertAllEqual(transform, IDENTITY)
            changed += int(np.any(out.numpy() != image))
        self.assertGreater(changed, 4)

    def test_ops_apply_in_sampled_order(self):
        image, mask = _labelled()
        names = ("Posterize", "ShearX", "Invert", "TranslateY")
        params = {
            "op_indices": tf.constant([randaugment.OP_NAMES.index(n) for n in names]),
            "levels": tf.constant([9, 5, 1, 3]),
            "signs": tf.constant([1.0, -1.0, 1.0, 1.0]),
            "fire": tf.constant([True, True, True, True]),
            "op_cutout_centers": tf.zeros([4, 2], tf.int32),
            "cutout_center": tf.zeros([2], tf.int32),
            "cutout": tf.constant(False),
        }
        out, out_mask, transform = randaugment.apply_policy(
            image, mask, params, interpolation="nearest"
        )
        want = randaugment.apply_op(image, None, name="Posterize", level=9)[0]
        want = randaugment.apply_op(want, None, name="Invert", level=1)[0]  # not commutative.
        shear = randaugment.apply_op(image, None, name="ShearX", level=5, sign=-1)[2]
        shift = randaugment.apply_op(image, None, name="TranslateY", level=3)[2]
        self.assertAllClose(transform, joint.compose_transforms(shear, shift))
        self.assertNotAllClose(transform, joint.compose_transforms(shift, shear))
        want, want_mask = joint.warp_image_and_mask(want, mask, transform, interpolation="nearest")
        self.assertAllEqual(out, want)
        self.assertAllEqual(out_mask, want_mask)

    @parameterized.parameters(0, 2, 3)
    def test_prob_zero_is_the_identity(self, num_layers):
        image, mask = _labelled()
        out, out_mask, transform = randaugment.distort(
            image, mask, seed=_seed(0), prob=0.0, cutout=False, num_layers=num_layers
        )
        self.assertAllEqual(out, image)
        self.assertAllEqual(out_mask, mask)
        self.assertAllEqual(transform, IDENTITY)

    def test_always_on_cutout_is_a_mean_square_of_half_the_shorter_side(self):
        image = np.full((40, 64, 3), 3, np.uint8)
        mask = np.ones((40, 64), np.uint8)
        for i in range(6):
            params = randaugment.sample_policy(_seed(i), height=40, width=64, prob=0.0)
            out, out_mask, _ = randaugment.apply_policy(image, mask, params)
            cy, cx = params["cutout_center"].numpy()
            want = np.zeros((40, 64), bool)
            want[max(cy - 10, 0) : cy + 10, max(cx - 10, 0) : cx + 10] = True
            self.assertAllEqual(np.all(out.numpy() == MEAN, -1), want)
            self.assertAllEqual(out_mask, mask)  # labels stay by default.

    def test_same_seed_same_output_and_seeds_differ(self):
        image, mask = _labelled()
        outputs = []
        for i in range(8):
            a = randaugment.distort(image, mask, seed=_seed(i))
            b = randaugment.distort(image, mask, seed=_seed(i))
            for x, y in zip(a, b):
                self.assertAllEqual(x, y)
            outputs.append(a[0].numpy().tobytes())
        self.assertGreaterEqual(len(set(outputs)), 7)

    def test_eager_and_tf_data_agree(self):
        image, mask = _labelled()
        ds = tf.data.Dataset.range(6).map(
            lambda i: randaugment.distort(
                image, mask, seed=seeds.example_seed(3, common.UNSUP_STREAM, i)
            ),
            num_parallel_calls=2,
        )
        for i, (g_image, g_mask, g_transform) in enumerate(ds):
            e_image, e_mask, e_transform = randaugment.distort(
                image, mask, seed=seeds.example_seed(3, common.UNSUP_STREAM, i)
            )
            self.assertAllEqual(g_image, e_image)
            self.assertAllEqual(g_mask, e_mask)
            self.assertAllEqual(g_transform, e_transform)

    def test_unknown_static_shape_in_graph(self):
        image, mask = _labelled()

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, 3], tf.uint8),
                tf.TensorSpec([None, None], tf.uint8),
                tf.TensorSpec([2], tf.int64),
            ]
        )
        def graph_distort(x, m, seed):
            return randaugment.distort(x, m, seed=seed, interpolation="nearest")

        for i in range(4):
            got = graph_distort(image, mask, _seed(i))
            want = randaugment.distort(image, mask, seed=_seed(i), interpolation="nearest")
            for g, w in zip(got, want):
                self.assertAllEqual(g, w)

    def test_batch_form_matches_per_example(self):
        image, mask = _labelled()
        images, masks = np.stack([image, image[::-1]]), np.stack([mask, mask[::-1]])
        batch_seeds = tf.constant([[1, 2], [3, 4]], tf.int64)
        out = randaugment.distort_batch(images, masks, seeds=batch_seeds, interpolation="nearest")
        no_mask = randaugment.distort_batch(images, seeds=batch_seeds, interpolation="nearest")
        self.assertIsNone(no_mask[1])
        for b in range(2):
            want = randaugment.distort(
                images[b], masks[b], seed=batch_seeds[b], interpolation="nearest"
            )
            for got, expected in zip((out[0][b], out[1][b], out[2][b]), want):
                self.assertAllEqual(got, expected)
            self.assertAllEqual(no_mask[0][b], want[0])

    @parameterized.parameters((180, 240), (1024, 2048))
    def test_non_square_sizes(self, height, width):
        image = np.zeros((height, width, 3), np.uint8)
        mask = np.zeros((height, width), np.uint8)
        out, out_mask, transform = randaugment.distort(image, mask, seed=_seed(5))
        self.assertEqual(out.shape, (height, width, 3))
        self.assertEqual(out_mask.shape, (height, width))
        self.assertEqual(transform.shape, (8,))


class SamplePolicyTest(tf.test.TestCase, parameterized.TestCase):
    def test_shapes_and_ranges(self):
        params = randaugment.sample_policy(_seed(0), image_shape=(30, 50, 3), num_layers=3)
        self.assertEqual(params["op_indices"].shape, (3,))
        self.assertEqual(params["op_cutout_centers"].shape, (3, 2))
        self.assertEqual(params["cutout_center"].dtype, tf.int32)
        self.assertTrue(bool(params["cutout"]))

    def test_distribution(self):
        draws = [randaugment.sample_policy(_seed(i), height=30, width=50) for i in range(300)]
        ops = np.concatenate([d["op_indices"].numpy() for d in draws])
        levels = np.concatenate([d["levels"].numpy() for d in draws])
        fire = np.concatenate([d["fire"].numpy() for d in draws])
        signs = np.concatenate([d["signs"].numpy() for d in draws])
        centers = np.stack([d["cutout_center"].numpy() for d in draws])
        self.assertEqual(set(ops), set(range(15)))  # 15 ops, with replacement.
        self.assertEqual(set(levels), set(range(1, 10)))
        self.assertEqual(set(signs), {-1.0, 1.0})
        self.assertBetween(fire.mean(), 0.4, 0.6)  # p = 0.5, 600 draws.
        self.assertTrue(np.all((centers >= 0) & (centers < [30, 50])))

    def test_photometric_ops_exclude_geometric(self):
        geometric = {randaugment.OP_NAMES.index(n) for n in randaugment.GEOMETRIC_OPS}
        for i in range(100):
            params = randaugment.sample_policy(_seed(i), height=8, width=8, ops="photometric")
            self.assertEmpty(set(params["op_indices"].numpy()) & geometric)

    def test_bad_arguments_raise(self):
        with self.assertRaisesRegex(ValueError, "ops="):
            randaugment.sample_policy(_seed(0), height=8, width=8, ops="colour")
        with self.assertRaisesRegex(ValueError, "prob="):
            randaugment.sample_policy(_seed(0), height=8, width=8, prob=1.5)
        with self.assertRaisesRegex(ValueError, "num_layers="):
            randaugment.sample_policy(_seed(0), height=8, width=8, num_layers=-1)
        with self.assertRaisesRegex(ValueError, "image_shape"):
            randaugment.sample_policy(_seed(0))


if __name__ == "__main__":
    tf.test.main()
