"""Tests of augment/color.py: goldens, Pillow parity, sampling, seeds, graph mode.

The goldens are computed by hand from the definitions in the module docstring
(luma weights 19595, 38470, 7471 / 2**16; Gaussian weights exp(-t**2 / 2
sigma**2) / sum; round half up at the end); they live here, beside the tests
that use them, rather than in golden_values.py.
"""

import colorsys
import functools

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image, ImageEnhance, ImageFilter

from augment import color, joint, seeds
from uda_tf import common

MEAN = np.array(common.MEAN_RGB_UINT8, np.uint8)
IDENTITY = joint.IDENTITY_TRANSFORM
_OFF = {
    "jitter": False,
    "grey": False,
    "blur": False,
    "order": (0, 1, 2, 3),
    "brightness": 1.0,
    "contrast": 1.0,
    "saturation": 1.0,
    "hue": 0.0,
    "sigma": 1.0,
}


def _params(**overrides):
    """Fixed parameters: nothing fires and every factor is the identity, but `overrides`."""
    values = {**_OFF, **overrides}
    dtypes = {"jitter": tf.bool, "grey": tf.bool, "blur": tf.bool, "order": tf.int32}
    return {k: tf.constant(v, dtypes.get(k, tf.float32)) for k, v in values.items()}


def _jitter(image, **factors):
    """apply_color with only the jitter on, the given factors, the others identity."""
    return color.apply_color(np.asarray(image, np.uint8), _params(jitter=True, **factors)).numpy()


def _test_image(height=32, width=48, low=0, high=255):
    """Deterministic RGB: three gradients plus noise, in [low, high]."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / (width + height)], -1)
    image = low + (high - low) * (0.7 * base + 0.15) + rng.normal(0, 20, (height, width, 3))
    return np.clip(np.round(image), low, high).astype(np.uint8)


def _seed(i):
    return tf.constant([i, 29], tf.int64)


class GoldenTest(tf.test.TestCase, parameterized.TestCase):
    def test_brightness_multiplies_clips_and_rounds_half_up(self):
        image = [[[10, 100, 200], [3, 5, 7]]]
        self.assertAllEqual(_jitter(image, brightness=1.5), [[[15, 150, 255], [5, 8, 11]]])
        # 1.5, 2.5, 3.5 round half up (Pillow would truncate to 1, 2, 3).
        self.assertAllEqual(_jitter(image, brightness=0.5), [[[5, 50, 100], [2, 3, 4]]])
        self.assertAllEqual(_jitter(image, brightness=0.0), np.zeros([1, 2, 3]))

    def test_contrast_blends_with_the_rounded_mean_grey(self):
        # L = 0 and 255: mean 127.5, grey int(128.0) = 128.
        image = [[[0, 0, 0], [255, 255, 255]]]
        # 0.5 * 0 + 0.5 * 128 = 64; 0.5 * 255 + 64 = 191.5 -> 192.
        self.assertAllEqual(_jitter(image, contrast=0.5), [[[64] * 3, [192] * 3]])
        # 1.5 * 0 - 0.5 * 128 = -64 -> 0; 382.5 - 64 = 318.5 -> 255.
        self.assertAllEqual(_jitter(image, contrast=1.5), [[[0] * 3, [255] * 3]])
        # L = 0 and 1: mean 0.5 rounds up to grey 1 (Pillow's int(mean + 0.5)).
        self.assertAllEqual(_jitter([[[0, 0, 0], [1, 1, 1]]], contrast=0.0), np.ones([1, 2, 3]))
        flat = np.full([2, 2, 3], 100, np.uint8)
        self.assertAllEqual(_jitter(flat, contrast=1.5), flat)

    def test_saturation_blends_with_the_luma(self):
        # L(200, 100, 50) = (19595 * 200 + 38470 * 100 + 7471 * 50) / 2**16 = 124.1997.
        image = [[[200, 100, 50]]]
        # 0.5 x + 0.5 L = 162.0998, 112.0998, 87.0998.
        self.assertAllEqual(_jitter(image, saturation=0.5), [[[162, 112, 87]]])
        # 1.5 x - 0.5 L = 237.9002, 87.9002, 12.9002.
        self.assertAllEqual(_jitter(image, saturation=1.5), [[[238, 88, 13]]])
        self.assertAllEqual(_jitter(image, saturation=0.0), [[[124, 124, 124]]])

    def test_greyscale_is_pillow_luma_in_three_channels(self):
        # Red 76.24, green 149.69, blue 29.07, (200, 100, 50) 124.20.
        image = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]]], np.uint8)
        out = color.apply_color(image, _params(grey=True)).numpy()
        self.assertAllEqual(out, np.repeat(np.array([[76, 150, 29, 124]])[..., None], 3, -1))

    @parameterized.parameters(
        ((255, 0, 0), 1 / 3, (0, 255, 0)),
        ((255, 0, 0), -1 / 3, (0, 0, 255)),
        ((255, 0, 0), 0.5, (0, 255, 255)),
        ((255, 0, 0), 1 / 6, (255, 255, 0)),
        # h = (100 - 50) / 150 / 6 = 1/18; + 1/4 = 0.3056, sector 1 (yellow ->
        # green): R = 200 - 150 * (6 * 0.3056 - 1) = 75, G = max, B = min.
        ((200, 100, 50), 0.25, (75, 200, 50)),
        ((90, 90, 90), 0.25, (90, 90, 90)),  # grey has no hue.
    )
    def test_hue_shifts_in_hsv(self, rgb, shift, want):
        self.assertAllEqual(_jitter([[rgb]], hue=shift), [[want]])

    def test_hue_matches_colorsys(self):
        image = _test_image(8, 12)
        for shift in (-0.25, -0.1, 0.07, 0.25):
            want = [
                np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
                for h, s, v in (colorsys.rgb_to_hsv(*(p / 255.0)) for p in image.reshape(-1, 3))
            ]
            want = np.floor(np.reshape(want, image.shape) + 0.5)
            self.assertAllClose(_jitter(image, hue=shift), want, atol=1)

    def test_gaussian_kernel_and_radius(self):
        # sigma 1: exp(-t**2 / 2) for t = 0..3 over their sum 2.505950.
        want = [0.004433, 0.054006, 0.242036, 0.399050, 0.242036, 0.054006, 0.004433]
        self.assertAllClose(color.gaussian_kernel(1.0), want, atol=1e-6)
        for sigma, radius in ((0.1, 1), (0.34, 2), (1.0, 3), (1.5, 5), (2.0, 6)):
            self.assertEqual(int(color.blur_radius(sigma)), radius)
            self.assertEqual(color.gaussian_kernel(sigma).shape, [2 * radius + 1])

    def test_blur_of_an_impulse(self):
        # 255 at the centre of 9x9, sigma 1 (radius 3, no reflection reaches
        # it): 255 w_i w_j, w = 0.399050, 0.242036, 0.054006, 0.004433, e.g.
        # 40.61 -> 41, 24.63 -> 25, 5.4955 -> 5, 14.94 -> 15, 3.333 -> 3, 0.744 -> 1.
        quarter = np.array([[41, 25, 5, 0], [25, 15, 3, 0], [5, 3, 1, 0], [0, 0, 0, 0]])
        half = np.concatenate([quarter[::-1], quarter[1:]], 0)
        want = np.zeros([9, 9], np.int32)
        want[1:8, 1:8] = np.concatenate([half[:, ::-1], half[:, 1:]], 1)
        image = np.zeros([9, 9, 3], np.uint8)
        image[4, 4] = 255
        out = color.apply_color(image, _params(blur=True, sigma=1.0)).numpy()
        self.assertAllEqual(out, np.repeat(want[..., None], 3, -1))

    @parameterized.parameters(((7, 11), 1.5), ((32, 48), 0.6), ((3, 4), 2.0), ((1, 5), 1.0))
    def test_blur_matches_numpy_reference(self, shape, sigma):
        image = np.random.default_rng(1).integers(0, 256, shape + (3,)).astype(np.uint8)
        kernel = color.gaussian_kernel(sigma).numpy().astype(np.float64)
        r = len(kernel) // 2

        def reflect(i, n):  # "dcb|abcd|cba", repeated for pads wider than the side.
            period = max(2 * n - 2, 1)
            i = np.mod(i, period)
            return np.where(i >= n, period - i, i)

        x = image.astype(np.float64)
        rows = x[reflect(np.arange(-r, shape[0] + r), shape[0])]
        x = sum(kernel[j] * rows[j : j + shape[0]] for j in range(2 * r + 1))
        cols = x[:, reflect(np.arange(-r, shape[1] + r), shape[1])]
        x = sum(kernel[j] * cols[:, j : j + shape[1]] for j in range(2 * r + 1))
        blurred = color.gaussian_blur(tf.constant(image, tf.float32), sigma)
        self.assertAllClose(blurred, x, atol=1e-3)
        out = color.apply_color(image, _params(blur=True, sigma=sigma)).numpy()
        self.assertAllClose(out, np.floor(x + 0.5), atol=1)


class PillowParityTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(
        name=("brightness", "contrast", "saturation"),
        factor=(0.5, 0.8, 1.3, 1.5),
        low_contrast=(False, True),
    )
    def test_enhance_matches_pillow(self, name, factor, low_contrast):
        image = _test_image(low=60, high=150) if low_contrast else _test_image()
        enhancer = {
            "brightness": ImageEnhance.Brightness,
            "contrast": ImageEnhance.Contrast,
            "saturation": ImageEnhance.Color,
        }[name]
        want = np.asarray(enhancer(Image.fromarray(image)).enhance(factor)).astype(int)
        diff = _jitter(image, **{name: factor}).astype(int) - want
        # Pillow truncates where we round (and its Color blends with the rounded
        # L): never below Pillow's, at most one level above.
        self.assertContainsSubset(set(np.unique(diff)), {0, 1})
        self.assertGreater(np.mean(diff == 0), 0.2)

    def test_greyscale_equals_pillow_l(self):
        image = _test_image()
        out = color.apply_color(image, _params(grey=True)).numpy()
        want = np.asarray(Image.fromarray(image).convert("L"))
        self.assertAllEqual(out, np.repeat(want[..., None], 3, -1))

    @parameterized.parameters(1.0, 1.5, 2.0)
    def test_blur_is_close_to_pillow_gaussian_blur(self, sigma):
        image = _test_image()
        pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
        inner = (slice(8, -8), slice(8, -8))  # Pillow extends the border instead.

        def error(s):
            out = color.apply_color(image, _params(blur=True, sigma=s)).numpy()
            return np.abs(out.astype(int) - pil)[inner]

        self.assertLess(error(sigma).mean(), 0.6)
        self.assertLessEqual(error(sigma).max(), 3)
        # A sigma off by 1.5x is clearly further: the radius means sigma, as Pillow's.
        self.assertLess(error(sigma).mean() * 3, error(sigma * 1.5).mean())
        self.assertLess(error(sigma).mean() * 3, error(sigma / 1.5).mean())


class ApplyTest(tf.test.TestCase, parameterized.TestCase):
    def test_identity_parameters_are_the_identity(self):
        image = _test_image()
        self.assertAllEqual(color.apply_color(image, _params()), image)
        for order in ((0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
            self.assertAllEqual(_jitter(image, order=order), image)

    def test_ops_apply_in_the_sampled_order(self):
        image = _test_image(8, 12, low=120, high=255)
        factors = {"brightness": 1.5, "contrast": 0.5, "saturation": 1.4, "hue": 0.2}
        ops = {
            0: lambda x: color.brightness(x, 1.5),
            1: lambda x: color.contrast(x, 0.5),
            2: lambda x: color.saturation(x, 1.4),
            3: lambda x: color.hue_shift(x, 0.2),
        }
        outputs = set()
        for order in ((0, 1, 2, 3), (1, 0, 3, 2), (3, 2, 1, 0), (2, 3, 0, 1)):
            x = tf.constant(image, tf.float32)
            for i in order:
                x = ops[i](x)
            want = tf.cast(x + 0.5, tf.uint8)
            got = _jitter(image, order=order, **factors)
            self.assertAllEqual(got, want)
            outputs.add(got.tobytes())
        self.assertLen(outputs, 4)  # the order matters (clipping, hue).

    def test_jitter_then_grey_then_blur(self):
        image = _test_image(8, 12)
        params = _params(jitter=True, grey=True, blur=True, brightness=0.7, sigma=0.8)
        x = color.brightness(tf.constant(image, tf.float32), 0.7)
        want = color.gaussian_blur(color.greyscale(x), 0.8)
        self.assertAllEqual(color.apply_color(image, params), tf.cast(want + 0.5, tf.uint8))

    def test_bad_images_raise(self):
        with self.assertRaisesRegex(ValueError, "uint8"):
            color.apply_color(np.zeros([4, 4, 3], np.float32), _params())
        with self.assertRaisesRegex(ValueError, "3"):
            color.color_view(np.zeros([4, 4, 4], np.uint8), seed=_seed(0))


@functools.cache
def _graph_view(**kwargs):
    """color_view(image, mask, seed=..., **kwargs) traced once for any image size."""
    spec = [
        tf.TensorSpec([None, None, 3], tf.uint8),
        tf.TensorSpec([None, None], tf.uint8),
        tf.TensorSpec([2], tf.int64),
    ]
    return tf.function(
        lambda x, m, seed: color.color_view(x, m, seed=seed, **kwargs), input_signature=spec
    )


class ColorViewTest(tf.test.TestCase, parameterized.TestCase):
    def test_never_moves_and_keeps_the_mask(self):
        image = _test_image(24, 40)
        mask = (np.arange(24 * 40) % 19).astype(np.uint8).reshape(24, 40)
        for i in range(8):
            out, out_mask, transform = _graph_view()(image, mask, _seed(i))
            self.assertEqual(out.dtype, tf.uint8)
            self.assertEqual(out.shape, image.shape)
            self.assertAllEqual(transform, IDENTITY)
            self.assertAllEqual(out_mask, mask)
        out, none, transform = color.color_view(image, seed=_seed(0), cutout=False)
        self.assertIsNone(none)
        self.assertAllEqual(transform, IDENTITY)

    def test_cutout_is_randaugments_mean_square(self):
        image = _test_image(24, 40)
        mask = np.zeros([24, 40], np.uint8)
        for i in range(4):
            plain, _, _ = _graph_view(cutout=False)(image, mask, _seed(i))
            cut, cut_mask, _ = _graph_view(cutout_ignore=True)(image, mask, _seed(i))
            changed = np.any(plain.numpy() != cut.numpy(), -1)
            square = cut_mask.numpy() == 255  # cutout_ignore marks the square.
            rows, cols = np.nonzero(square)
            self.assertTrue(np.all(changed <= square))
            self.assertAllEqual(cut.numpy()[square], np.broadcast_to(MEAN, [square.sum(), 3]))
            self.assertLessEqual(np.ptp(rows) + 1, 12)  # half the shorter side, clipped.
            self.assertLessEqual(np.ptp(cols) + 1, 12)

    def test_same_seed_same_output_and_seeds_differ(self):
        image, mask = _test_image(16, 24), np.zeros([16, 24], np.uint8)
        outputs = []
        for i in range(10):
            a = _graph_view()(image, mask, _seed(i))[0].numpy()
            self.assertAllEqual(_graph_view()(image, mask, _seed(i))[0], a)
            outputs.append(a.tobytes())
        self.assertGreaterEqual(len(set(outputs)), 9)

    def test_eager_and_tf_data_agree(self):
        image = _test_image(16, 24)
        mask = np.ones([16, 24], np.uint8)

        def view(i):
            return color.color_view(image, mask, seed=seeds.example_seed(3, 1, i))

        ds = tf.data.Dataset.range(4).map(view, num_parallel_calls=2)
        for i, graph in enumerate(ds):
            for g, e in zip(graph, view(tf.constant(i, tf.int64))):
                self.assertAllEqual(g, e)

    def test_unknown_static_shape_in_graph(self):
        for shape in ((5, 3), (1, 1)):  # tiny: the blur reflects more than once.
            image, mask = _test_image(*shape), np.zeros(shape, np.uint8)
            for i in (4, 7):
                graph, _, _ = _graph_view()(image, mask, _seed(i))
                self.assertAllEqual(graph, color.color_view(image, seed=_seed(i))[0])


class SampleTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        ds = tf.data.Dataset.range(2000).map(lambda i: color.sample_color_params(seed=[i, 5]))
        cls.draws = {k: v.numpy() for k, v in next(iter(ds.batch(2000))).items()}

    def test_probabilities(self):
        # Binomial standard deviations over 2000 draws: 0.009, 0.009, 0.011.
        self.assertAllClose(np.mean(self.draws["jitter"]), 0.8, atol=0.04)
        self.assertAllClose(np.mean(self.draws["grey"]), 0.2, atol=0.04)
        self.assertAllClose(np.mean(self.draws["blur"]), 0.5, atol=0.045)
        # Independent streams: the flags are uncorrelated.
        both = np.mean(self.draws["jitter"] & self.draws["blur"])
        self.assertAllClose(both, 0.4, atol=0.04)

    def test_ranges_and_means(self):
        for name in ("brightness", "contrast", "saturation"):
            values = self.draws[name]
            self.assertBetween(values.min(), 0.5, 0.52)
            self.assertBetween(values.max(), 1.48, 1.5)
            self.assertAllClose(values.mean(), 1.0, atol=0.03)
        self.assertBetween(self.draws["hue"].min(), -0.25, -0.24)
        self.assertBetween(self.draws["hue"].max(), 0.24, 0.25)
        self.assertBetween(self.draws["sigma"].min(), 0.1, 0.12)
        self.assertBetween(self.draws["sigma"].max(), 1.98, 2.0)
        self.assertAllClose(self.draws["sigma"].mean(), 1.05, atol=0.05)
        self.assertLess(
            abs(np.corrcoef(self.draws["brightness"], self.draws["contrast"])[0, 1]), 0.1
        )

    def test_order_is_a_uniform_permutation(self):
        order = self.draws["order"]
        self.assertEqual(order.dtype, np.int32)
        self.assertAllEqual(np.sort(order, axis=1), np.tile(np.arange(4), [2000, 1]))
        self.assertLen({tuple(o) for o in order}, 24)
        for slot in range(4):  # each op is at each slot a quarter of the time.
            counts = np.bincount(order[:, slot], minlength=4) / 2000
            self.assertAllClose(counts, [0.25] * 4, atol=0.04)

    def test_strengths_and_probabilities_are_arguments(self):
        params = color.sample_color_params(
            seed=[1, 2], brightness=0.0, contrast=2.0, hue=0.0, jitter_prob=1.0, blur_prob=0.0
        )
        self.assertEqual(float(params["brightness"]), 1.0)
        self.assertBetween(float(params["contrast"]), 0.0, 3.0)
        self.assertEqual(float(params["hue"]), 0.0)
        self.assertTrue(bool(params["jitter"]))
        self.assertFalse(bool(params["blur"]))

    def test_bad_arguments_raise(self):
        for kwargs in (
            {"grey_prob": 1.5},
            {"saturation": -0.1},
            {"hue": 0.6},
            {"sigma_range": (0.0, 1.0)},
            {"sigma_range": (2.0, 1.0)},
        ):
            with self.assertRaises(ValueError, msg=str(kwargs)):
                color.sample_color_params(seed=[0, 0], **kwargs)
