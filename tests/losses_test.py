"""Tests of uda_tf/losses.py and uda_tf/targets.py: SPEC §7 and §8 vectors, per-pixel
properties, hard targets, warping, CutMix of the targets."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests import golden_values as gv
from uda_tf import losses


def _pixels(values):
    """[P, K] (or [P]) -> [1, 1, P, K] (or [1, 1, P]): P pixels of one image."""
    return tf.constant(values, tf.float32 if np.asarray(values).dtype.kind == "f" else tf.int32)[
        None, None
    ]


def _translation(dx, dy):
    """Aug pixel (x, y) reads ori pixel (x + dx, y + dy)."""
    return tf.constant([[1.0, 0.0, dx, 0.0, 1.0, dy, 0.0, 0.0]])


class TsaTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(*gv.TSA_THRESHOLDS)
    def test_threshold_golden(self, schedule, progress, num_classes, expected):
        eta = losses.tsa_threshold(schedule=schedule, progress=progress, num_classes=num_classes)
        self.assertAllClose(eta, expected, atol=1e-5)

    def test_unknown_schedule_raises(self):
        with self.assertRaisesRegex(ValueError, "cosine"):
            losses.tsa_threshold(schedule="cosine", progress=0.5, num_classes=19)

    @parameterized.parameters(
        (0.5, gv.TSA_LOSS_AT_HALF, 1.0 / 3.0),
        (1.0, gv.TSA_LOSS_AT_ONE, 1.0),
        (0.0, gv.TSA_LOSS_AT_ZERO, 1 / 3),
    )
    def test_masking_golden(self, progress, expected_loss, expected_ratio):
        out = losses.supervised_loss(
            logits=_pixels(gv.TSA_LOGITS),
            labels=_pixels(gv.TSA_LABELS),
            num_classes=3,
            tsa="linear_schedule",
            progress=progress,
        )
        self.assertAllClose(out["loss"], expected_loss, atol=1e-5)
        self.assertAllClose(out["trained_ratio"], expected_ratio, atol=1e-6)

    def test_per_pixel_ce_and_correct_prob(self):
        out = losses.supervised_loss(
            logits=_pixels(gv.TSA_LOGITS), labels=_pixels(gv.TSA_LABELS), num_classes=3
        )
        self.assertAllClose(out["loss"], np.mean(gv.TSA_CE), atol=1e-5)
        self.assertAllClose(np.exp(-np.array(gv.TSA_CE)), gv.TSA_P_CORRECT, atol=1e-4)
        self.assertAllClose(out["threshold"], 1.0)

    def test_ignored_pixels_change_neither_sum(self):
        base = {"num_classes": 3, "tsa": "linear_schedule", "progress": 0.5}
        ref = losses.supervised_loss(
            logits=_pixels(gv.TSA_LOGITS), labels=_pixels(gv.TSA_LABELS), **base
        )
        logits = list(gv.TSA_LOGITS) + [(-5.0, 9.0, 1.0), (0.0, 0.0, 0.0)]
        labels = list(gv.TSA_LABELS) + [255, 255]
        out = losses.supervised_loss(logits=_pixels(logits), labels=_pixels(labels), **base)
        for key in ("loss", "num_kept", "num_valid", "trained_ratio"):
            self.assertAllClose(out[key], ref[key], atol=1e-6)

    def test_dropping_every_pixel_gives_zero_not_nan(self):
        logits = tf.Variable(_pixels([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]))
        with tf.GradientTape() as tape:
            out = losses.supervised_loss(
                logits=logits,
                labels=_pixels([0, 1]),
                num_classes=3,
                tsa="log_schedule",
                progress=0.0,
            )
        grad = tape.gradient(out["loss"], logits)
        self.assertEqual(float(out["loss"]), 0.0)
        self.assertEqual(float(out["trained_ratio"]), 0.0)
        self.assertAllEqual(grad, tf.zeros_like(grad))

    def test_all_pixels_ignored_gives_zero(self):
        out = losses.supervised_loss(
            logits=_pixels([[1.0, 2.0, 3.0]]), labels=_pixels([255]), num_classes=3
        )
        self.assertEqual(float(out["loss"]), 0.0)

    def test_tsa_without_progress_raises(self):
        with self.assertRaisesRegex(ValueError, "linear_schedule"):
            losses.supervised_loss(
                logits=_pixels(gv.TSA_LOGITS),
                labels=_pixels(gv.TSA_LABELS),
                num_classes=3,
                tsa="linear_schedule",
            )

    def test_nan_logits_are_not_scrubbed(self):
        out = losses.supervised_loss(
            logits=_pixels([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0]]),
            labels=_pixels([0, 0]),
            num_classes=3,
        )
        self.assertTrue(np.isnan(out["loss"]))

    def test_global_sum_fn_divides_by_the_global_count(self):
        out = losses.supervised_loss(
            logits=_pixels(gv.TSA_LOGITS),
            labels=_pixels(gv.TSA_LABELS),
            num_classes=3,
            global_sum_fn=lambda x: 4.0 * x,
        )
        self.assertAllClose(out["loss"], np.sum(gv.TSA_CE) / 12.0, atol=1e-5)
        self.assertAllClose(out["num_valid"], 12.0)


class ConsistencyTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(*gv.CONS_KL)
    def test_kl_golden(self, temp, expected):
        out = losses.consistency_loss(
            ori_logits=_pixels([gv.CONS_ORI]), aug_logits=_pixels([gv.CONS_AUG]), softmax_temp=temp
        )
        self.assertAllClose(out["loss"], expected, atol=1e-5)

    @parameterized.parameters(*gv.CONS_TARGETS)
    def test_target_golden(self, temp, expected):
        target, confidence = losses.consistency_target(
            ori_logits=_pixels([gv.CONS_ORI]), softmax_temp=temp
        )
        self.assertAllClose(target[0, 0, 0], expected, atol=1e-5)
        # The confidence is the unsharpened max prob, whatever T.
        self.assertAllClose(confidence[0, 0, 0], gv.CONS_TARGETS[0][1][0], atol=1e-5)

    def test_confidence_masked_pixels_stay_in_the_denominator(self):
        out = losses.consistency_loss(
            ori_logits=_pixels([gv.CONS_ORI, gv.CONS_ORI_B]),
            aug_logits=_pixels([gv.CONS_AUG, gv.CONS_AUG_B]),
            softmax_temp=0.4,
            confidence_thresh=0.8,
        )
        self.assertAllClose(out["loss"], gv.CONS_MASKED_LOSS, atol=1e-5)
        self.assertNotAllClose(out["loss"], gv.CONS_MASKED_LOSS_WRONG, atol=1e-3)
        self.assertAllClose(out["high_prob_ratio"], 0.5)
        self.assertAllClose(out["num_valid"], 2.0)

    def test_invalid_pixels_change_neither_sum(self):
        common = {"softmax_temp": 0.4, "confidence_thresh": 0.8}
        out = losses.consistency_loss(
            ori_logits=_pixels([gv.CONS_ORI, gv.CONS_ORI_B, [7.0, 0.0, 0.0]]),
            aug_logits=_pixels([gv.CONS_AUG, gv.CONS_AUG_B, [0.0, 0.0, 9.0]]),
            valid=tf.constant([[[True, True, False]]]),
            **common,
        )
        self.assertAllClose(out["loss"], gv.CONS_MASKED_LOSS, atol=1e-5)
        self.assertAllClose(out["num_valid"], 2.0)

    def test_gradient_is_q_minus_target_and_never_reaches_the_target(self):
        ori = tf.Variable(_pixels([gv.CONS_ORI, gv.CONS_ORI_B]))
        aug = tf.Variable(_pixels([gv.CONS_AUG, gv.CONS_AUG_B]))
        with tf.GradientTape(persistent=True) as tape:
            loss = losses.consistency_loss(ori_logits=ori, aug_logits=aug, softmax_temp=0.4)["loss"]
        target = tf.nn.softmax(ori / 0.4)
        # Sharpening never touches the aug logits: d/dz_aug = softmax(z_aug) - target.
        expected = (tf.nn.softmax(aug) - target) / 2.0
        self.assertAllClose(tape.gradient(loss, aug), expected, atol=1e-6)
        self.assertIsNone(tape.gradient(loss, ori))

    def test_entropy_golden_and_gradient(self):
        logits = tf.Variable(_pixels([gv.CONS_ORI, gv.CONS_ORI]))
        with tf.GradientTape() as tape:
            out = losses.entropy_loss(logits=logits, valid=tf.constant([[[True, False]]]))
        self.assertAllClose(out["loss"], gv.ENTROPY_ORI, atol=1e-5)
        grad = tape.gradient(out["loss"], logits)
        self.assertGreater(float(tf.reduce_sum(tf.abs(grad[0, 0, 0]))), 0.0)
        self.assertAllEqual(grad[0, 0, 1], tf.zeros(3))

    def test_warped_loss_uses_the_aug_frame(self):
        rng = np.random.default_rng(0)
        ori = tf.constant(rng.normal(size=(1, 6, 8, 3)) * 3, tf.float32)
        aug = tf.constant(rng.normal(size=(1, 6, 8, 3)), tf.float32)
        out = losses.consistency_loss(
            ori_logits=ori, aug_logits=aug, transforms=_translation(2.0, 0.0), softmax_temp=0.5
        )
        # Aug column x shows ori column x + 2; the last two columns are invalid.
        ref = losses.consistency_loss(
            ori_logits=ori[:, :, 2:], aug_logits=aug[:, :, :6], softmax_temp=0.5
        )
        self.assertAllClose(out["loss"], ref["loss"], atol=1e-6)
        self.assertAllClose(out["num_valid"], 36.0)


class HardTargetTest(tf.test.TestCase, parameterized.TestCase):
    """--uda_loss=ce: cross-entropy to the argmax of the unsharpened target."""

    def _two_pixels(self, **kwargs):
        return losses.consistency_loss(
            ori_logits=_pixels([gv.CONS_ORI, gv.CONS_ORI_B]),
            aug_logits=_pixels([gv.CONS_AUG, gv.CONS_AUG_B]),
            uda_loss="ce",
            **kwargs,
        )

    def test_per_pixel_golden(self):
        target, confidence = losses.consistency_target(
            ori_logits=_pixels([gv.CONS_ORI, gv.CONS_ORI_B])
        )
        self.assertAllClose(confidence[0, 0], gv.HARD_P_MAX, atol=1e-5)
        self.assertAllEqual(tf.argmax(target[0, 0], -1), gv.HARD_ARGMAX)
        for i, (ori, aug) in enumerate(
            ((gv.CONS_ORI, gv.CONS_AUG), (gv.CONS_ORI_B, gv.CONS_AUG_B))
        ):
            out = losses.consistency_loss(
                ori_logits=_pixels([ori]), aug_logits=_pixels([aug]), uda_loss="ce"
            )
            self.assertAllClose(out["loss"], gv.HARD_CE[i], atol=1e-5)

    @parameterized.parameters(*gv.HARD_LOSSES)
    def test_masked_mean_golden(self, thresh, expected):
        out = self._two_pixels(confidence_thresh=thresh)
        self.assertAllClose(out["loss"], expected, atol=1e-5)
        self.assertAllClose(out["num_valid"], 2.0)  # the same denominator, masked or not
        self.assertAllClose(out["high_prob_ratio"], 0.5 if thresh == 0.8 else 1.0)

    def test_gradient_is_q_minus_one_hot_and_never_reaches_the_target(self):
        ori = tf.Variable(_pixels([gv.CONS_ORI, gv.CONS_ORI_B]))
        aug = tf.Variable(_pixels([gv.CONS_AUG, gv.CONS_AUG_B]))
        with tf.GradientTape(persistent=True) as tape:
            loss = losses.consistency_loss(ori_logits=ori, aug_logits=aug, uda_loss="ce")["loss"]
        expected = (tf.nn.softmax(aug) - tf.one_hot([[gv.HARD_ARGMAX]], 3)) / 2.0
        self.assertAllClose(tape.gradient(loss, aug), expected, atol=1e-6)
        self.assertIsNone(tape.gradient(loss, ori))

    def test_kl_of_a_one_hot_target_is_the_hard_ce(self):
        # A saturated ori prediction: KL to it and CE to its argmax agree.
        rng = np.random.default_rng(3)
        ori = tf.one_hot(rng.integers(0, 4, size=(2, 5, 6)), 4) * 40.0
        aug = tf.constant(rng.normal(size=(2, 5, 6, 4)), tf.float32)
        kl = losses.consistency_loss(ori_logits=ori, aug_logits=aug)["loss"]
        ce = losses.consistency_loss(ori_logits=ori, aug_logits=aug, uda_loss="ce")["loss"]
        self.assertAllClose(kl, ce, atol=1e-4)

    def test_warped_hard_target_uses_the_aug_frame(self):
        rng = np.random.default_rng(0)
        ori = tf.constant(rng.normal(size=(1, 6, 8, 3)) * 3, tf.float32)
        aug = tf.constant(rng.normal(size=(1, 6, 8, 3)), tf.float32)
        kwargs = {"uda_loss": "ce", "confidence_thresh": 0.5}
        out = losses.consistency_loss(
            ori_logits=ori, aug_logits=aug, transforms=_translation(2.0, 0.0), **kwargs
        )
        ref = losses.consistency_loss(ori_logits=ori[:, :, 2:], aug_logits=aug[:, :, :6], **kwargs)
        self.assertAllClose(out["loss"], ref["loss"], atol=1e-6)
        self.assertAllClose(out["high_prob_ratio"], ref["high_prob_ratio"], atol=1e-6)
        self.assertAllClose(out["num_valid"], 36.0)

    def test_bilinear_hard_target_is_the_argmax_of_the_warped_probabilities(self):
        rng = np.random.default_rng(1)
        ori = tf.constant(rng.normal(size=(1, 6, 8, 3)) * 3, tf.float32)
        aug = tf.constant(rng.normal(size=(1, 6, 8, 3)), tf.float32)
        transforms = _translation(0.5, 0.0)
        out = losses.consistency_loss(
            ori_logits=ori,
            aug_logits=aug,
            transforms=transforms,
            interpolation="bilinear",
            uda_loss="ce",
        )
        warped, _, valid = losses.warped_target(
            ori_logits=ori, output_shape=(6, 8), transforms=transforms, interpolation="bilinear"
        )
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.argmax(warped, -1), logits=aug
        )
        valid = tf.cast(valid, tf.float32)
        self.assertAllClose(out["loss"], tf.reduce_sum(ce * valid) / tf.reduce_sum(valid))

    def test_temperature_and_unknown_loss_raise(self):
        with self.assertRaisesRegex(ValueError, "--uda_loss=ce.*--uda_softmax_temp"):
            self._two_pixels(softmax_temp=0.4)
        with self.assertRaisesRegex(ValueError, "--uda_loss='mse'"):
            losses.consistency_loss(
                ori_logits=_pixels([gv.CONS_ORI]), aug_logits=_pixels([gv.CONS_AUG]), uda_loss="mse"
            )


class MixTargetsTest(tf.test.TestCase, parameterized.TestCase):
    """CutMix of the targets (uda_tf/targets.py:mix_targets)."""

    def _maps(self, n=3, h=4, w=5, k=2):
        target = tf.reshape(tf.range(n * h * w * k, dtype=tf.float32), [n, h, w, k])
        confidence = tf.reshape(tf.range(n * h * w, dtype=tf.float32), [n, h, w]) / 100.0
        valid = np.ones((n, h, w), bool)
        valid[1, 0] = False
        return target, confidence, tf.constant(valid)

    def test_inside_the_box_the_partner_outside_its_own(self):
        target, confidence, valid = self._maps()
        box = np.zeros((3, 4, 5), np.uint8)
        box[0, :2, 1:3] = 1  # image 0 shows image 1 there (partner[0] = 1)
        box[2, 1:, :] = 1
        partner = tf.constant([1, 2, 0])
        mixed = losses.mix_targets(
            target_prob=target,
            confidence=confidence,
            valid=valid,
            mix_mask=box,
            mix_partner=partner,
        )
        inside = box.astype(bool)
        for got, ref in zip(mixed, (target, confidence, valid)):
            ref = np.asarray(ref)
            want = np.where(
                inside.reshape(inside.shape + (1,) * (ref.ndim - 3)), ref[[1, 2, 0]], ref
            )
            self.assertAllEqual(got, want)
        self.assertEqual(mixed[2].dtype, tf.bool)
        self.assertFalse(bool(mixed[2][0, 0, 1]))  # image 1's invalid row, in image 0's box

    def test_global_concat_fn_finds_partners_on_other_replicas(self):
        target, confidence, valid = self._maps()
        everyone = [x * 10.0 for x in (target, confidence)]

        def concat(x):  # this replica holds images 3..5 of 6: 0..2 are elsewhere
            other = tf.concat([everyone[0], everyone[1][..., None], tf.zeros_like(x[..., :1])], -1)
            return tf.concat([other, x], axis=0)

        box = np.ones((3, 4, 5), np.uint8)
        mixed = losses.mix_targets(
            target_prob=target,
            confidence=confidence,
            valid=valid,
            mix_mask=box,
            mix_partner=tf.constant([0, 4, 5]),
            global_concat_fn=concat,
        )
        self.assertAllEqual(mixed[0][0], everyone[0][0])
        self.assertAllEqual(mixed[0][1:], tf.gather(target, [1, 2]))
        self.assertAllEqual(mixed[1][0], everyone[1][0])
        self.assertFalse(bool(tf.reduce_any(mixed[2][0])))

    def test_loss_with_an_empty_box_equals_the_unmixed_loss(self):
        rng = np.random.default_rng(4)
        ori = tf.constant(rng.normal(size=(3, 6, 8, 3)) * 3, tf.float32)
        aug = tf.constant(rng.normal(size=(3, 6, 8, 3)), tf.float32)
        for uda_loss in ("kl", "ce"):
            kwargs = {"transforms": _translation(1.0, -1.0), "uda_loss": uda_loss}
            plain = losses.consistency_loss(ori_logits=ori, aug_logits=aug, **kwargs)
            mixed = losses.consistency_loss(
                ori_logits=ori,
                aug_logits=aug,
                mix_mask=np.zeros((3, 6, 8), np.uint8),
                mix_partner=tf.constant([2, 0, 1]),
                **kwargs,
            )
            for key in plain:
                self.assertAllEqual(mixed[key], plain[key])

    def test_mix_mask_without_partner_raises(self):
        with self.assertRaisesRegex(ValueError, "mix_partner"):
            losses.consistency_loss(
                ori_logits=_pixels([gv.CONS_ORI]),
                aug_logits=_pixels([gv.CONS_AUG]),
                mix_mask=np.ones((1, 1, 1), np.uint8),
            )


class WarpTest(tf.test.TestCase, parameterized.TestCase):
    def _probs(self, shape=(2, 7, 9, 4), seed=0):
        logits = np.random.default_rng(seed).normal(size=shape)
        return tf.nn.softmax(tf.constant(logits, tf.float32))

    def test_identity_leaves_target_unchanged(self):
        probs = self._probs()
        warped, valid = losses.warp_to_aug(probs, tf.constant([[1.0, 0, 0, 0, 1.0, 0, 0, 0]]))
        self.assertAllEqual(warped, probs)
        self.assertTrue(bool(tf.reduce_all(valid)))

    def test_translation_shifts_and_marks_the_uncovered_band(self):
        probs = self._probs()
        warped, valid = losses.warp_to_aug(probs, _translation(-3.0, 1.0))
        # Aug (x, y) reads ori (x - 3, y + 1).
        self.assertAllEqual(warped[:, :-1, 3:], probs[:, 1:, :-3])
        self.assertFalse(bool(tf.reduce_any(valid[:, :, :3])))
        self.assertFalse(bool(tf.reduce_any(valid[:, -1])))
        self.assertTrue(bool(tf.reduce_all(valid[:, :-1, 3:])))
        self.assertAllEqual(warped[:, :, :3], tf.zeros_like(warped[:, :, :3]))

    def test_invalid_ori_pixels_stay_invalid(self):
        probs = self._probs()
        ori_valid = np.ones((2, 7, 9), np.uint8)
        ori_valid[:, 4, 5] = 0
        _, valid = losses.warp_to_aug(probs, _translation(1.0, 0.0), ori_valid=ori_valid)
        self.assertFalse(bool(valid[0, 4, 4]))
        self.assertEqual(int(tf.reduce_sum(tf.cast(valid, tf.int32))), 2 * (7 * 8 - 1))

    @parameterized.parameters("nearest", "bilinear")
    def test_matches_image_projective_transform_v3(self, interpolation):
        probs = self._probs(shape=(3, 10, 12, 2), seed=1)
        transforms = tf.constant(
            [
                [0.95, -0.2, 1.3, 0.15, 1.05, -0.7, 0.0, 0.0],  # rotation-like affine
                [1.0, 0.27, -2.5, 0.0, 1.0, 0.0, 0.0, 0.0],  # shear
                [1.02, 0.05, 0.4, -0.03, 0.98, 0.6, 0.004, -0.003],  # projective
            ]
        )
        warped, valid = losses.warp_to_aug(probs, transforms, interpolation=interpolation)
        ref = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.concat([probs, tf.ones_like(probs[..., :1])], -1),
            transforms=transforms,
            output_shape=[10, 12],
            fill_value=0.0,
            interpolation=interpolation.upper(),
            fill_mode="CONSTANT",
        )
        ref_valid = ref[..., -1] > 1 - 1e-4
        self.assertAllEqual(valid, ref_valid)
        self.assertGreater(int(tf.reduce_sum(tf.cast(valid, tf.int32))), 100)
        mask = tf.cast(ref_valid, tf.float32)[..., None]
        self.assertAllClose(warped, ref[..., :-1] * mask, atol=1e-5)

    def test_compiles_under_xla(self):
        probs = self._probs()
        warp = tf.function(lambda p, t: losses.warp_to_aug(p, t)[0], jit_compile=True)
        self.assertAllClose(
            warp(probs, _translation(1.0, 2.0)),
            losses.warp_to_aug(probs, _translation(1.0, 2.0))[0],
        )

    def test_target_matches_a_label_carrying_image(self):
        """Warp a one-hot target; build the aug label image by hand from the
        documented convention; they agree wherever the aug pixel is valid."""
        rng = np.random.default_rng(2)
        height, width, k = 12, 16, 5
        mask = rng.integers(0, k, size=(height, width))
        angle = np.deg2rad(15.0)
        a = [np.cos(angle), -np.sin(angle), 3.0, np.sin(angle), np.cos(angle), -2.0, 0.0, 0.0]
        aug_label_image = np.full((height, width), 255.0)
        for y in range(height):
            for x in range(width):
                sx = a[0] * x + a[1] * y + a[2]
                sy = a[3] * x + a[4] * y + a[5]
                rx, ry = int(np.floor(sx + 0.5)), int(np.floor(sy + 0.5))
                if 0 <= rx < width and 0 <= ry < height:
                    aug_label_image[y, x] = mask[ry, rx] * 10.0
        one_hot = tf.one_hot(mask[None], k)
        warped, valid = losses.warp_to_aug(one_hot, tf.constant([a], tf.float32))
        valid = valid[0].numpy()
        self.assertAllEqual(valid, aug_label_image != 255)
        self.assertAllEqual(tf.argmax(warped[0], -1).numpy()[valid] * 10.0, aug_label_image[valid])

    def test_unknown_interpolation_raises(self):
        with self.assertRaisesRegex(ValueError, "cubic"):
            losses.warp_to_aug(self._probs(), _translation(0, 0), interpolation="cubic")


if __name__ == "__main__":
    tf.test.main()
