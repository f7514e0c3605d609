"""Tests of augment/ops.py and augment/joint.py: Pillow parity, goldens, warps."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image, ImageEnhance, ImageOps

from augment import joint, ops, randaugment
from uda_tf import common

MEAN = np.array(common.MEAN_RGB_UINT8, np.uint8)
F = 255  # mask fill in the goldens below.


def _test_image(height=48, width=64, low=0, high=255):
    """Deterministic non-trivial RGB: three gradients plus noise, in [low, high]."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([x / (width - 1), y / (height - 1), (x + y) / (width + height - 2)], -1)
    image = low + (high - low) * (0.7 * base + 0.15) + rng.normal(0, 20, (height, width, 3))
    return np.clip(np.round(image), low, high).astype(np.uint8)


def _pil_reference(image, name, level):
    """UDA's image/randaugment/augmentation_transforms.py magnitudes, on Pillow."""
    pil = Image.fromarray(image)
    factor = level * 1.8 / 10 + 0.1  # float_parameter(level, 1.8) + 0.1
    table = {
        "Invert": lambda: ImageOps.invert(pil),
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
        "Posterize": lambda: ImageOps.posterize(pil, 4 - int(level * 4 / 10)),
        "Solarize": lambda: ImageOps.solarize(pil, 256 - int(level * 256 / 10)),
        "Color": lambda: ImageEnhance.Color(pil).enhance(factor),
        "Contrast": lambda: ImageEnhance.Contrast(pil).enhance(factor),
        "Brightness": lambda: ImageEnhance.Brightness(pil).enhance(factor),
        "Sharpness": lambda: ImageEnhance.Sharpness(pil).enhance(factor),
    }
    return np.asarray(table[name]())


PHOTOMETRIC = (
    "Invert", "AutoContrast", "Equalize", "Posterize", "Solarize",
    "Color", "Contrast", "Brightness", "Sharpness",
)  # fmt: skip


class PillowParityTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(name=PHOTOMETRIC, level=(1, 5, 9), low_contrast=(False, True))
    def test_photometric_matches_pillow(self, name, level, low_contrast):
        image = _test_image(low=60, high=150) if low_contrast else _test_image()
        mask = (np.arange(48 * 64) % 256).astype(np.uint8).reshape(48, 64)
        out, out_mask, transform = randaugment.apply_op(image, mask, name=name, level=level)
        want = _pil_reference(image, name, level)
        diff = np.abs(out.numpy().astype(int) - want.astype(int))
        self.assertGreaterEqual(np.mean(diff <= 1), 0.99, f"{name} L{level}")
        # Also no systematic off-by-one (e.g. rounding where Pillow truncates).
        self.assertGreaterEqual(np.mean(diff == 0), 0.95, f"{name} L{level}")
        self.assertEqual(out.dtype, tf.uint8)
        # Photometric ops never touch the mask, and move nothing.
        self.assertAllEqual(out_mask, mask)
        self.assertAllEqual(transform, joint.IDENTITY_TRANSFORM)

    @parameterized.parameters(
        ("ShearX", (1, 0.27, 0, 0, 1, 0)),
        ("ShearY", (1, 0, 0, -0.15, 1, 0)),
        ("TranslateX", (1, 0, 9, 0, 1, 0)),
        ("TranslateY", (1, 0, 0, 0, 1, -6)),
    )
    def test_affine_nearest_matches_pillow(self, name, data):
        image = _test_image()
        fn = {
            "ShearX": lambda: ops.shear_x(image, None, data[1], interpolation="nearest"),
            "ShearY": lambda: ops.shear_y(image, None, data[3], interpolation="nearest"),
            "TranslateX": lambda: ops.translate_x(image, None, data[2], interpolation="nearest"),
            "TranslateY": lambda: ops.translate_y(image, None, data[5], interpolation="nearest"),
        }[name]
        out = fn()[0].numpy()
        pil = Image.fromarray(image)
        want = np.asarray(pil.transform(pil.size, Image.AFFINE, data, fillcolor=tuple(MEAN)))
        self.assertGreaterEqual(np.mean(np.all(out == want, -1)), 0.99)

    @parameterized.parameters(27, -15, 3)
    def test_rotate_nearest_matches_pillow(self, degrees):
        image = _test_image()
        out = ops.rotate(image, None, degrees, interpolation="nearest")[0].numpy()
        want = np.asarray(Image.fromarray(image).rotate(degrees, fillcolor=tuple(MEAN)))
        self.assertGreaterEqual(np.mean(np.all(out == want, -1)), 0.99)


class GoldenTest(tf.test.TestCase, parameterized.TestCase):
    """Hand-checkable cases (Model Garden style) and ORIGINAL_UDA.md §4.2 tables."""

    def test_rotate_3x3(self):
        image = np.repeat(np.arange(9, dtype=np.uint8).reshape(3, 3, 1), 3, -1)
        mask = np.arange(9, dtype=np.uint8).reshape(3, 3)
        out, out_mask, _ = ops.rotate(image, mask, 90.0, interpolation="nearest")
        ccw = [[2, 5, 8], [1, 4, 7], [0, 3, 6]]  # PIL's rotate(90): counter-clockwise.
        self.assertAllEqual(out[..., 0], ccw)
        self.assertAllEqual(out_mask, ccw)
        out, out_mask, _ = ops.rotate(image, mask, -90.0, interpolation="bilinear")
        self.assertAllEqual(out[..., 1], [[6, 3, 0], [7, 4, 1], [8, 5, 2]])

    def test_translate_4x4(self):
        image = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), 3, -1)
        mask = image[..., 0].copy()
        out, out_mask, transform = ops.translate_x(image, mask, 1)
        want = [[1, 2, 3, F], [5, 6, 7, F], [9, 10, 11, F], [13, 14, 15, F]]
        self.assertAllEqual(out_mask, want)
        self.assertAllEqual(out[..., 0], np.where(np.array(want) == F, MEAN[0], want))
        self.assertAllEqual(out[:, 3], np.tile(MEAN, (4, 1)))
        self.assertAllClose(transform, [1, 0, 1, 0, 1, 0, 0, 0], atol=1e-5)
        out, out_mask, transform = ops.translate_y(image, mask, -1, interpolation="nearest")
        self.assertAllEqual(out_mask, [[F] * 4, [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
        self.assertAllClose(transform, [1, 0, 0, 0, 1, -1, 0, 0], atol=1e-5)

    def test_shear_x_4x4_about_top_left(self):
        # PIL's (1, s, 0, 0, 1, 0): source column = floor(x + 0.5 + s * (y + 0.5)).
        mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
        image = np.repeat(mask[..., None], 3, -1)
        _, out_mask, transform = ops.shear_x(image, mask, 0.5, interpolation="nearest")
        want = [[0, 1, 2, 3], [5, 6, 7, F], [9, 10, 11, F], [14, 15, F, F]]
        self.assertAllEqual(out_mask, want)
        self.assertAllClose(transform, [1, 0.5, 0.25, 0, 1, 0, 0, 0], atol=1e-5)

    def test_posterize_table(self):
        ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, -1)
        bits_table = (4, 4, 3, 3, 2, 2, 2, 1, 1)  # ORIGINAL_UDA.md §4.2, L = 1..9.
        for level, bits in enumerate(bits_table, start=1):
            out = randaugment.apply_op(ramp, None, name="Posterize", level=level)[0]
            keep = (0xFF << (8 - bits)) & 0xFF
            self.assertAllEqual(out, ramp & keep, msg=f"level {level}")

    def test_solarize_table(self):
        ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, -1)
        thresholds = (231, 205, 180, 154, 128, 103, 77, 52, 26)  # ORIGINAL_UDA.md §4.2.
        for level, threshold in enumerate(thresholds, start=1):
            out = randaugment.apply_op(ramp, None, name="Solarize", level=level)[0]
            want = np.where(ramp < threshold, ramp, 255 - ramp)
            self.assertAllEqual(out, want, msg=f"level {level}")

    def test_enhance_factors(self):
        # factor 0.18 L + 0.1: 0.28, 1.00, 1.72 at L = 1, 5, 9 (Brightness truncates).
        image = np.full((3, 3, 3), 100, np.uint8)
        for level, want in ((1, 28), (5, 100), (9, 172)):
            out = randaugment.apply_op(image, None, name="Brightness", level=level)[0]
            self.assertAllEqual(out, np.full((3, 3, 3), want))

    @parameterized.parameters(
        ("ShearX", 5, 1, [1, 0.15, 0.075, 0, 1, 0, 0, 0]),
        ("ShearY", 9, -1, [1, 0, 0, -0.27, 1, -0.135, 0, 0]),
        ("TranslateX", 5, 1, [1, 0, 5, 0, 1, 0, 0, 0]),  # 5 px of 32.
        ("TranslateY", 9, -1, [1, 0, 0, 0, 1, -9, 0, 0]),
    )
    def test_magnitudes_on_32x32(self, name, level, sign, want):
        image = np.zeros((32, 32, 3), np.uint8)
        transform = randaugment.apply_op(image, None, name=name, level=level, sign=sign)[2]
        self.assertAllClose(transform, want, atol=1e-5)

    def test_translate_scales_with_the_side(self):
        image = np.zeros((64, 128, 3), np.uint8)
        tx = randaugment.apply_op(image, None, name="TranslateX", level=3)[2]
        ty = randaugment.apply_op(image, None, name="TranslateY", level=3)[2]
        self.assertAllClose([tx[2], ty[5]], [12.0, 6.0])  # 3/32 of 128 and of 64.

    def test_rotate_magnitude_is_3_level_degrees(self):
        image = np.zeros((31, 31, 3), np.uint8)
        transform = randaugment.apply_op(image, None, name="Rotate", level=9, sign=1)[2]
        angle = np.deg2rad(27.0)
        self.assertAllClose(transform[:2], [np.cos(angle), -np.sin(angle)], atol=1e-5)
        # The centre pixel (15, 15) maps to itself.
        centre = transform.numpy()
        self.assertAllClose(
            [
                centre[0] * 15 + centre[1] * 15 + centre[2],
                centre[3] * 15 + centre[4] * 15 + centre[5],
            ],
            [15, 15],
            atol=1e-4,
        )

    def test_cutout_golden_and_clipping(self):
        image = np.zeros((4, 6, 3), np.uint8)
        mask = np.ones((4, 6), np.int32)
        out, out_mask = ops.cutout(image, mask, center=[1, 1], size=2)
        want = np.zeros((4, 6), bool)
        want[0:2, 0:2] = True
        self.assertAllEqual(np.all(out.numpy() == MEAN, -1), want)
        self.assertAllEqual(out_mask, mask)  # labels stay by default.
        out, out_mask = ops.cutout(image, mask, center=[3, 5], size=4, ignore_mask=True)
        want = np.zeros((4, 6), bool)
        want[1:4, 3:6] = True  # rows 1..4, cols 3..7 clipped at the border.
        self.assertAllEqual(np.all(out.numpy() == MEAN, -1), want)
        self.assertAllEqual(out_mask, np.where(want, 255, 1))
        self.assertEqual(out_mask.dtype, tf.int32)

    def test_cutout_op_side_is_2l_of_32_of_shorter_side(self):
        image = np.zeros((64, 96, 3), np.uint8)
        out = randaugment.apply_op(image, None, name="Cutout", level=8)[0].numpy()
        rows, cols = np.nonzero(np.all(out == MEAN, -1))
        self.assertEqual((np.ptp(rows) + 1, np.ptp(cols) + 1), (32, 32))  # 16/32 of 64.


class WarpTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("nearest", "bilinear")
    def test_warp_equals_raw_op_with_per_channel_fill(self, interpolation):
        image = _test_image(37, 53)
        for transform in (
            ops.translate_transform(3.0, -2.0),
            ops.shear_y_transform(0.2),
            ops.rotate_transform(17.0, 37, 53),
        ):
            out = joint.warp_image(image, transform, interpolation=interpolation)
            x = tf.cast(image, tf.float32)[None] - MEAN.astype(np.float32)
            ref = tf.raw_ops.ImageProjectiveTransformV3(
                images=x,
                transforms=transform[None],
                output_shape=[37, 53],
                fill_value=0.0,
                interpolation=interpolation.upper(),
                fill_mode="CONSTANT",
            )[0]
            want = np.floor(ref.numpy() + MEAN + 0.5).astype(np.uint8)
            self.assertAllEqual(out, want)

    @parameterized.parameters(
        (tf.uint8, (20, 30)), (tf.uint8, (20, 30, 1)), (tf.int32, (20, 30)), (tf.int16, (20, 30, 1))
    )
    def test_mask_dtype_shape_and_values_kept(self, dtype, shape):
        mask = tf.cast(np.random.default_rng(0).integers(0, 19, shape), dtype)
        image = _test_image(20, 30)
        for interpolation in ("nearest", "bilinear"):
            _, out_mask, transform = ops.rotate(image, mask, 20.0, interpolation=interpolation)
            self.assertEqual(out_mask.dtype, dtype)
            self.assertEqual(out_mask.shape, shape)
            self.assertAllEqual(out_mask, joint.warp_mask(mask, transform))
            self.assertContainsSubset(set(np.unique(out_mask)), set(range(19)) | {255})

    def test_compose_equals_sequential_whole_pixel_warps(self):
        image = _test_image(20, 30)
        t1, t2 = ops.translate_transform(3.0, 0.0), ops.translate_transform(-1.0, 4.0)
        once = joint.warp_image(image, joint.compose_transforms(t1, t2), interpolation="nearest")
        twice = joint.warp_image(
            joint.warp_image(image, t1, interpolation="nearest"), t2, interpolation="nearest"
        )
        # Where the first warp's fill does not reach, both agree.
        self.assertAllEqual(once[:16, 1:28], twice[:16, 1:28])
        self.assertAllClose(joint.compose_transforms(t1, t2), [1, 0, 2, 0, 1, 4, 0, 0])

    def test_compose_order_is_first_warp_first(self):
        # Warping by t1 then by a whole-pixel t2 is exactly one warp by t1 @ t2.
        image = _test_image(20, 30)
        t1, t2 = ops.shear_x_transform(0.3), ops.translate_transform(0.0, 3.0)
        once = joint.warp_image(image, joint.compose_transforms(t1, t2), interpolation="nearest")
        twice = joint.warp_image(
            joint.warp_image(image, t1, interpolation="nearest"), t2, interpolation="nearest"
        )
        self.assertAllEqual(once[:17], twice[:17])
        swapped = joint.compose_transforms(t2, t1)
        self.assertNotAllClose(swapped, joint.compose_transforms(t1, t2))

    def test_bad_inputs_raise(self):
        with self.assertRaisesRegex(ValueError, "uint8"):
            ops.invert(np.zeros((4, 4, 3), np.float32))
        with self.assertRaisesRegex(ValueError, "interpolation"):
            joint.warp_image(
                np.zeros((4, 4, 3), np.uint8), joint.IDENTITY_TRANSFORM, interpolation="cubic"
            )
        with self.assertRaisesRegex(ValueError, "mask"):
            ops.shear_x(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), 0.1)
        with self.assertRaisesRegex(ValueError, "Blur"):
            randaugment.apply_op(np.zeros((4, 4, 3), np.uint8), None, name="Blur", level=1)


if __name__ == "__main__":
    tf.test.main()
