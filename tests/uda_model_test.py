"""Tests of uda_tf/uda_model.py: the UDA train step, EMA, weight decay, distribution."""

import dataclasses
import os
import tempfile
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from augment import mix
from tests import golden_values as gv
from uda_tf import common, losses, train
from uda_tf.config import UDA_TARGETS, TrainConfig, UdaConfig
from uda_tf.schedules import build_optimizer
from uda_tf.uda_model import (
    TerminateOnNonFiniteLoss,
    UdaModel,
    apply_weight_decay,
    flip_averaged_logits,
)

NUM_CLASSES = 3
SIZE = 32
UDA_ON = UdaConfig(
    unsup_ratio=1,
    tsa="linear_schedule",
    uda_confidence_thresh=0.36,
    uda_softmax_temp=0.5,
    ent_min_coeff=0.1,
    unsup_coeff=2.0,
    num_classes=NUM_CLASSES,
    train_steps=4,
)
UDA_OFF = UdaConfig(unsup_ratio=0, num_classes=NUM_CLASSES, train_steps=4)


def tiny_network(seed=0, batch_norm=False):
    """Two convolutions, <= 16 filters; synchronized BN when asked."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(synchronized=True)(x)
    outputs = keras.layers.Conv2D(NUM_CLASSES, 1)(x)
    return keras.Model(inputs, outputs, name="tiny")


def make_batch(sup_size=4, unsup_size=4, seed=0):
    """A fixed batch. The ignored pixels and invalid ori pixels are unevenly
    spread over the batch, so per-replica means differ from global ones."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (sup_size, SIZE, SIZE, 3), dtype=np.uint8)
    mask = (image[..., 0] // 86).astype(np.uint8)  # learnable: a function of red
    mask[0, :, : SIZE - 4] = 255
    mask[1, :8] = 255
    ori = rng.integers(0, 256, (unsup_size, SIZE, SIZE, 3), dtype=np.uint8)
    ori_valid = np.ones((unsup_size, SIZE, SIZE), np.uint8)
    ori_valid[0, :20] = 0
    shift = np.array([3, -2, 0, 5][:unsup_size], np.float32)
    transforms = np.zeros((unsup_size, 8), np.float32)
    transforms[:, 0] = transforms[:, 4] = 1.0
    transforms[:, 2] = shift  # aug pixel x reads ori pixel x + shift
    aug = np.stack([np.roll(o, -int(s), axis=1) for o, s in zip(ori, shift)])
    return {
        common.IMAGE: image,
        common.MASK: mask,
        common.ORI_IMAGE: ori,
        common.ORI_VALID: ori_valid,
        common.AUG_IMAGE: aug,
        common.AUG_TRANSFORM: transforms,
    }


# The entropy term trains through the originals' pass: "shared" only.
UDA_NO_ENT = dataclasses.replace(UDA_ON, ent_min_coeff=0.0)


def with_target(uda, uda_target, **changes):
    """`uda` with --uda_target (and a teacher run's name, which make_model does not read)."""
    teacher_dir = "teacher_run" if uda_target == "teacher" else ""
    return dataclasses.replace(uda, uda_target=uda_target, uda_teacher_dir=teacher_dir, **changes)


def cutmix(batch, seed=7, prob=1.0):
    """`batch` with its aug views CutMixed by augment/mix.py (every image by default)."""
    seed = tf.constant([seed, common.MIX_STREAM], tf.int64)
    mixed = mix.cutmix_batch({k: tf.constant(v) for k, v in batch.items()}, seed=seed, prob=prob)
    return {k: v.numpy() for k, v in mixed.items()}


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def numpy_consistency(batch, ori_logits, aug_logits, *, uda_loss, softmax_temp, thresh):
    """L_cons by hand for make_batch's x-shift transforms, CutMix included.

    Each image's target is shifted into its aug frame, then mixed with the
    partner's inside the box; every pixel is compared with the target of the
    image it came from.
    """
    ori_logits, aug_logits = np.asarray(ori_logits, np.float64), np.asarray(aug_logits, np.float64)
    n, h, w, _ = ori_logits.shape
    prob = _softmax(ori_logits / (softmax_temp if softmax_temp != -1 else 1.0))
    conf = _softmax(ori_logits).max(-1)
    ori_valid = batch[common.ORI_VALID].astype(bool)
    target, confidence = np.zeros_like(prob), np.zeros_like(conf)
    valid = np.zeros((n, h, w), bool)
    for i, shift in enumerate(batch[common.AUG_TRANSFORM][:, 2].astype(int)):
        for x in range(w):  # aug pixel x shows ori pixel x + shift
            if 0 <= x + shift < w:
                target[i, :, x] = prob[i, :, x + shift]
                confidence[i, :, x] = conf[i, :, x + shift]
                valid[i, :, x] = ori_valid[i, :, x + shift]
    if common.MIX_MASK in batch:
        box, partner = batch[common.MIX_MASK].astype(bool), batch[common.MIX_PARTNER]
        target = np.where(box[..., None], target[partner], target)
        confidence = np.where(box, confidence[partner], confidence)
        valid = np.where(box, valid[partner], valid)
    log_q = np.log(_softmax(aug_logits))
    if uda_loss == "kl":
        div = np.sum(np.where(target > 0, target * np.log(np.maximum(target, 1e-30)), 0.0), -1)
        div -= np.sum(target * log_q, -1)
    else:
        div = -np.take_along_axis(log_q, target.argmax(-1)[..., None], -1)[..., 0]
    keep = valid & ((confidence > thresh) if thresh != -1 else True)
    return np.sum(np.where(keep, div, 0.0)) / max(valid.sum(), 1)


def make_model(uda=UDA_ON, *, seed=0, decay=0.5, wd=1e-3, lr=0.1, batch_norm=False):
    # --uda_target=teacher: a fixed network of other weights (another seed).
    teacher = tiny_network(seed + 1, batch_norm) if uda.uda_target == "teacher" else None
    model = UdaModel(
        tiny_network(seed, batch_norm),
        uda=uda,
        moving_average_decay=decay,
        weight_decay_rate=wd,
        teacher_network=teacher,
    )
    model.compile(optimizer=build_optimizer(learning_rate=lr, train_steps=uda.train_steps))
    return model


def dataset(batch):
    return tf.data.Dataset.from_tensors(batch).repeat()


def weights_of(model):
    return [w.numpy() for w in model.network.weights]


class TrainStepTest(tf.test.TestCase, parameterized.TestCase):
    def test_logs_match_the_losses_module(self):
        model = make_model()
        batch = make_batch()
        initial = [w.numpy() for w in model.network.trainable_weights]
        logits = model.network(
            tf.cast(
                tf.concat(
                    [batch[common.IMAGE], batch[common.ORI_IMAGE], batch[common.AUG_IMAGE]], 0
                ),
                tf.float32,
            ),
            training=True,
        )
        sup = losses.supervised_loss(
            logits=logits[:4],
            labels=batch[common.MASK],
            num_classes=NUM_CLASSES,
            tsa="linear_schedule",
            progress=0.0,
        )
        cons = losses.consistency_loss(
            ori_logits=logits[4:8],
            aug_logits=logits[8:],
            softmax_temp=0.5,
            confidence_thresh=0.36,
            transforms=batch[common.AUG_TRANSFORM],
            ori_valid=batch[common.ORI_VALID],
        )
        ent = losses.entropy_loss(logits=logits[4:8], valid=batch[common.ORI_VALID])
        wd = 0.5 * 1e-3 * sum(float(np.sum(w**2)) for w in initial)
        logs = model.train_step(batch)
        self.assertAllClose(logs["sup/loss"], sup["loss"], atol=1e-5)
        self.assertAllClose(logs["sup/trained_ratio"], sup["trained_ratio"], atol=1e-6)
        self.assertAllClose(logs["sup/tsa_threshold"], 1.0 / 3.0, atol=1e-6)
        self.assertAllClose(logs["unsup/loss"], cons["loss"], atol=1e-5)
        self.assertAllClose(logs["unsup/high_prob_ratio"], cons["high_prob_ratio"], atol=1e-6)
        self.assertAllClose(logs["unsup/ent_min_loss"], ent["loss"], atol=1e-5)
        expected_total = sup["loss"] + 2.0 * cons["loss"] + 0.1 * ent["loss"] + wd
        self.assertAllClose(logs["total_loss"], expected_total, atol=1e-5)
        self.assertAllClose(logs["lr"], 0.1)
        # The run is not trivial: TSA and the confidence mask both drop pixels.
        self.assertBetween(float(logs["sup/trained_ratio"]), 0.05, 0.95)
        self.assertBetween(float(logs["unsup/high_prob_ratio"]), 0.05, 0.95)

    def test_weight_decay_is_half_wd_sum_of_squares_over_every_variable(self):
        network = tiny_network(batch_norm=True)
        count = apply_weight_decay(network, 5e-4)
        self.assertEqual(count, len(network.trainable_variables))
        self.assertEqual(count, 6)  # 2 kernels, 2 biases, BN gamma and beta
        by_hand = (
            0.5 * 5e-4 * sum(float(np.sum(v.numpy() ** 2)) for v in network.trainable_variables)
        )
        self.assertAllClose(tf.add_n(network.losses), by_hand, rtol=1e-6)
        model = UdaModel(network, uda=UDA_OFF, moving_average_decay=0.0)
        self.assertAllClose(model._weight_decay_share(), by_hand, rtol=1e-6)

    def test_ema_matches_the_closed_form(self):
        decay = 0.5
        model = make_model(decay=decay)
        batch = make_batch()
        history = [weights_of(model)]
        for _ in range(3):
            model.train_step(batch)
            history.append(weights_of(model))
        # shadow_n = d^n v_0 + (1 - d) sum_k d^(n-k) v_k
        n = len(history) - 1
        for i, shadow in enumerate(model.ema_network.weights):
            expected = decay**n * history[0][i] + sum(
                (1 - decay) * decay ** (n - k) * history[k][i] for k in range(1, n + 1)
            )
            self.assertAllClose(shadow, expected, atol=1e-6)
        self.assertNotAllClose(model.ema_network.weights[0], model.network.weights[0])
        # Evaluation uses the shadows and leaves the trained weights alone.
        images = batch[common.IMAGE]
        self.assertAllClose(model(images), model.ema_network(tf.cast(images, tf.float32)))
        before = weights_of(model)
        model.evaluate(dataset(batch), steps=1, verbose=0)
        for a, b in zip(before, weights_of(model)):
            self.assertAllEqual(a, b)

    def test_ema_off_uses_the_network(self):
        model = make_model(decay=0.0)
        self.assertIs(model.ema_network, model.network)
        self.assertLen(model.weights, len(model.network.weights))

    def test_ema_is_saved_with_the_weights(self):
        model = make_model()
        model.train_step(make_batch())
        other = make_model(seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.weights.h5")
            model.save_weights(path)
            other.load_weights(path)
        for a, b in zip(model.weights, other.weights):
            self.assertAllEqual(a, b)
        self.assertNotAllClose(other.ema_network.weights[0], other.network.weights[0])

    def test_fit_under_xla(self):
        model = make_model()
        model.compile(optimizer=build_optimizer(learning_rate=0.1, train_steps=4), jit_compile=True)
        history = model.fit(dataset(make_batch()), epochs=1, steps_per_epoch=2, verbose=0)
        self.assertTrue(np.isfinite(history.history["total_loss"][-1]))
        self.assertEqual(int(model.optimizer.iterations), 2)

    @parameterized.parameters(UDA_OFF, UDA_ON)
    def test_fit_decreases_the_loss_on_a_fixed_batch(self, uda):
        model = make_model(uda, decay=0.9, lr=0.05)
        batch = make_batch()
        history = model.fit(dataset(batch), epochs=4, steps_per_epoch=3, verbose=0)
        sup_loss = history.history["sup/loss"]
        self.assertLess(sup_loss[-1], sup_loss[0])
        expected_keys = {"sup/loss", "sup/tsa_threshold", "sup/trained_ratio", "total_loss", "lr"}
        if uda.unsup_ratio:
            expected_keys |= {"unsup/loss", "unsup/high_prob_ratio", "unsup/ent_min_loss"}
        self.assertEqual(set(history.history), expected_keys)
        self.assertEqual(int(model.optimizer.iterations), 12)
        result = model.evaluate(dataset(batch), steps=2, return_dict=True, verbose=0)
        self.assertEqual(set(result), {"mean_iou"})
        self.assertBetween(result["mean_iou"], 0.0, 1.0)

    def test_same_seed_same_weights(self):
        runs = []
        for _ in range(2):
            model = make_model()
            for _ in range(3):
                model.train_step(make_batch())
            runs.append(weights_of(model) + [w.numpy() for w in model.ema_network.weights])
        for a, b in zip(*runs):
            self.assertAllEqual(a, b)

    def test_non_finite_loss_stops_fit_naming_step_and_terms(self):
        model = make_model()
        kernel = model.network.trainable_weights[0]
        kernel.assign(tf.fill(kernel.shape, np.nan))
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, r"(?s)step.*sup/loss.*unsup/loss.*total_loss"
        ):
            model.fit(dataset(make_batch()), epochs=1, steps_per_epoch=1, verbose=0)
        self.assertTrue(np.isnan(kernel.numpy()).all())  # untouched, not scrubbed

    def test_callback_names_step_and_terms(self):
        model = make_model()
        callback = TerminateOnNonFiniteLoss()
        callback.set_model(model)
        callback.on_train_batch_end(0, {"sup/loss": 1.0, "total_loss": 2.0})
        with self.assertRaisesRegex(FloatingPointError, r"step 0.*unsup/loss': nan"):
            callback.on_train_batch_end(0, {"sup/loss": 1.0, "unsup/loss": float("nan")})

    def test_missing_unlabeled_keys_raise(self):
        model = make_model()
        batch = make_batch()
        del batch[common.AUG_IMAGE]
        with self.assertRaisesRegex(ValueError, "aug_image"):
            model.train_step(batch)

    def test_cutmix_without_the_mix_keys_raises(self):
        model = make_model(dataclasses.replace(UDA_ON, unsup_mix="cutmix"))
        with self.assertRaisesRegex(ValueError, r"mix_mask.*mix_partner.*--unsup_mix=cutmix"):
            model.train_step(make_batch())


# The configs of golden_values.PINNED_STEP_LOGS.
PINNED_CONFIGS = {
    "defaults": UdaConfig(unsup_ratio=1, num_classes=NUM_CLASSES, train_steps=4),
    "uda_on": UDA_ON,
    "ema": dataclasses.replace(UDA_NO_ENT, uda_target="ema"),
    "inference_bn": dataclasses.replace(UDA_NO_ENT, uda_target="inference"),
}


class PinnedDefaultsTest(tf.test.TestCase, parameterized.TestCase):
    """The default flags give the losses of the code before --uda_loss and --unsup_mix."""

    def test_the_new_options_default_to_the_original(self):
        self.assertEqual((UdaConfig().uda_loss, UdaConfig().unsup_mix), ("kl", "none"))

    @parameterized.parameters(*sorted(gv.PINNED_STEP_LOGS))
    def test_second_step_logs(self, name):
        model = make_model(PINNED_CONFIGS[name], batch_norm=name == "inference_bn")
        for _ in range(2):
            logs = model.train_step(make_batch())
        for key, value in gv.PINNED_STEP_LOGS[name].items():
            # Bit-exact where they were computed; 1e-6 leaves other CPUs' kernels room.
            self.assertAllClose(logs[key], value, rtol=0.0, atol=1e-6, msg=key)


class UdaLossAndMixTest(tf.test.TestCase, parameterized.TestCase):
    """--uda_loss and --unsup_mix with every --uda_target."""

    @parameterized.product(
        uda_target=UDA_TARGETS, uda_loss=("kl", "ce"), unsup_mix=("none", "cutmix")
    )
    def test_unsup_loss_matches_a_numpy_reference(self, uda_target, uda_loss, unsup_mix):
        uda = with_target(
            UDA_NO_ENT,
            uda_target,
            uda_loss=uda_loss,
            unsup_mix=unsup_mix,
            uda_softmax_temp=0.5 if uda_loss == "kl" else -1.0,
        )
        batch = cutmix(make_batch()) if unsup_mix == "cutmix" else make_batch()
        model = make_model(uda)  # no BN: the target pass of each mode is plain to replicate
        model.train_step(batch)  # the EMA now differs from the network
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        aug_logits = model.network(tf.cast(batch[common.AUG_IMAGE], tf.float32), training=True)
        teacher = {"ema": model.ema_network, "teacher": model.teacher_network}.get(
            uda_target, model.network
        )
        kwargs = {"uda_loss": uda_loss, "softmax_temp": uda.uda_softmax_temp, "thresh": 0.36}
        expected = numpy_consistency(batch, teacher(ori), aug_logits, **kwargs)
        logs = model.train_step(batch)
        for key in losses_keys(logs):
            self.assertTrue(np.isfinite(logs[key]), key)
        self.assertAllClose(logs["unsup/loss"], expected, atol=1e-5)
        self.assertGreater(float(logs["unsup/loss"]), 0.0)
        if unsup_mix == "cutmix":  # the targets are mixed, not just the images
            unmixed = {k: v for k, v in batch.items() if k not in (common.MIX_MASK,)}
            wrong = numpy_consistency(unmixed, teacher(ori), aug_logits, **kwargs)
            self.assertNotAllClose(logs["unsup/loss"], wrong, atol=1e-3)
        # The (hard) target is the teacher's, not the student's.
        if uda_target in ("ema", "teacher"):
            student = numpy_consistency(batch, model.network(ori), aug_logits, **kwargs)
            self.assertNotAllClose(expected, student, atol=1e-5)

    @parameterized.product(uda_target=UDA_TARGETS, uda_loss=("kl", "ce"))
    def test_cutmix_steps_with_batch_norm_are_finite(self, uda_target, uda_loss):
        uda = with_target(UDA_NO_ENT, uda_target, uda_loss=uda_loss, unsup_mix="cutmix")
        if uda_loss == "ce":
            uda = dataclasses.replace(uda, uda_softmax_temp=-1.0)
        model = make_model(uda, batch_norm=True)
        batch = cutmix(make_batch(), prob=0.5)
        for _ in range(2):
            logs = model.train_step(batch)
        for key in losses_keys(logs):
            self.assertTrue(np.isfinite(logs[key]), key)

    def test_cutmix_ce_fit_under_xla(self):
        uda = dataclasses.replace(UDA_ON, uda_loss="ce", uda_softmax_temp=-1.0, unsup_mix="cutmix")
        model = make_model(uda)
        model.compile(optimizer=build_optimizer(learning_rate=0.1, train_steps=4), jit_compile=True)
        history = model.fit(dataset(cutmix(make_batch())), epochs=1, steps_per_epoch=2, verbose=0)
        self.assertTrue(np.isfinite(history.history["unsup/loss"][-1]))

    def test_invalid_combinations_raise_naming_both_flags(self):
        with self.assertRaisesRegex(ValueError, r"--uda_loss=ce.*--uda_softmax_temp=0.5"):
            dataclasses.replace(UDA_ON, uda_loss="ce").validate()
        with self.assertRaisesRegex(ValueError, r"--unsup_mix='cutmix'.*--unsup_ratio=0"):
            dataclasses.replace(UDA_OFF, unsup_mix="cutmix").validate()
        with self.assertRaisesRegex(ValueError, r"--uda_loss='ce'.*--unsup_ratio=0"):
            dataclasses.replace(UDA_OFF, uda_loss="ce").validate()


def losses_keys(logs):
    return [k for k in ("sup/loss", "unsup/loss", "unsup/ent_min_loss", "total_loss") if k in logs]


class UdaTargetTest(tf.test.TestCase):
    """--uda_target: where the consistency target on the originals comes from."""

    def _cons(self, batch, ori_logits, aug_logits):
        return losses.consistency_loss(
            ori_logits=ori_logits,
            aug_logits=aug_logits,
            softmax_temp=0.5,
            confidence_thresh=0.36,
            transforms=batch[common.AUG_TRANSFORM],
            ori_valid=batch[common.ORI_VALID],
        )["loss"]

    def _train_images(self, batch):
        return tf.cast(tf.concat([batch[common.IMAGE], batch[common.AUG_IMAGE]], 0), tf.float32)

    def test_inference_equals_shared_without_batch_norm(self):
        # Without BN an image's logits do not depend on its batch: the
        # separate target pass must give the same step as the shared one.
        batch = make_batch()
        shared = make_model(UDA_NO_ENT)
        separate = make_model(dataclasses.replace(UDA_NO_ENT, uda_target="inference"))
        for _ in range(2):
            a, b = shared.train_step(batch), separate.train_step(batch)
            for key in a:
                self.assertAllClose(a[key], b[key], atol=1e-6, msg=key)
        for a, b in zip(weights_of(shared), weights_of(separate)):
            self.assertAllClose(a, b, atol=1e-6)

    def test_inference_target_uses_bn_moving_statistics(self):
        batch = make_batch()
        uda = dataclasses.replace(UDA_NO_ENT, uda_target="inference")
        reference = make_model(uda, batch_norm=True)  # same seed, for the expected values
        model = make_model(uda, batch_norm=True)
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        target = reference.network(ori, training=False)  # before any BN update
        logits = reference.network(self._train_images(batch), training=True)
        expected = self._cons(batch, target, logits[4:])
        logs = model.train_step(batch)
        self.assertAllClose(logs["unsup/loss"], expected, atol=1e-5)
        # Not what the shared pass gives: BN makes the difference.
        shared_logs = make_model(UDA_NO_ENT, batch_norm=True).train_step(batch)
        self.assertNotAllClose(logs["unsup/loss"], shared_logs["unsup/loss"], atol=1e-3)

    def test_ema_target_comes_from_the_ema_network(self):
        batch = make_batch()
        model = make_model(dataclasses.replace(UDA_NO_ENT, uda_target="ema"), decay=0.5)
        model.train_step(batch)  # the shadows now differ from the weights
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        aug_logits = model.network(self._train_images(batch), training=True)[4:]
        expected = self._cons(batch, model.ema_network(ori, training=False), aug_logits)
        from_network = self._cons(batch, model.network(ori, training=False), aug_logits)
        self.assertNotAllClose(expected, from_network, atol=1e-4)
        logs = model.train_step(batch)
        self.assertAllClose(logs["unsup/loss"], expected, atol=1e-5)

    def test_a_fixed_teacher_gives_the_targets_and_is_never_trained_or_saved(self):
        batch = make_batch()
        model = make_model(with_target(UDA_NO_ENT, "teacher"), decay=0.5)
        teacher = model.teacher_network
        before = [w.numpy() for w in teacher.weights]
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        for _ in range(2):
            aug_logits = model.network(self._train_images(batch), training=True)[4:]
            expected = self._cons(batch, teacher(ori, training=False), aug_logits)
            logs = model.train_step(batch)
            self.assertAllClose(logs["unsup/loss"], expected, atol=1e-5)
        for a, b in zip(before, teacher.weights):
            self.assertAllEqual(a, b)
        # The model's weights (and so its checkpoints) are the student's and its EMA's only.
        plain = make_model(dataclasses.replace(UDA_NO_ENT, uda_target="ema"), decay=0.5)
        self.assertLen(model.weights, len(plain.weights))
        self.assertFalse({id(w) for w in teacher.weights} & {id(w) for w in model.weights})

    def test_teacher_network_goes_with_the_teacher_target_only(self):
        with self.assertRaisesRegex(ValueError, "--uda_target=ema needs a teacher network"):
            UdaModel(
                tiny_network(),
                uda=dataclasses.replace(UDA_NO_ENT, uda_target="ema"),
                teacher_network=tiny_network(1),
            )
        with self.assertRaisesRegex(ValueError, "--uda_target=teacher needs a teacher network"):
            UdaModel(tiny_network(), uda=with_target(UDA_NO_ENT, "teacher"))
        with self.assertRaisesRegex(
            ValueError, r"--uda_target=teacher contradicts --uda_teacher_dir=''"
        ):
            dataclasses.replace(UDA_NO_ENT, uda_target="teacher").validate()
        with self.assertRaisesRegex(
            ValueError, r"--uda_target=ema contradicts --uda_teacher_dir='run'"
        ):
            dataclasses.replace(UDA_NO_ENT, uda_target="ema", uda_teacher_dir="run").validate()

    def test_flip_target_is_the_mean_of_the_mirrored_probabilities(self):
        batch = make_batch()
        uda = dataclasses.replace(UDA_NO_ENT, uda_target="ema", uda_target_flip=True)
        model = make_model(uda, decay=0.5)
        model.train_step(batch)
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        aug_logits = model.network(self._train_images(batch), training=True)[4:]
        teacher = model.ema_network
        probs = tf.nn.softmax(teacher(ori, training=False))
        mirrored = tf.reverse(tf.nn.softmax(teacher(tf.reverse(ori, [2]), training=False)), [2])
        expected = self._cons(batch, tf.math.log((probs + mirrored) / 2.0), aug_logits)
        unflipped = self._cons(batch, teacher(ori, training=False), aug_logits)
        self.assertNotAllClose(expected, unflipped, atol=1e-4)  # the 3x3 net is not symmetric
        logs = model.train_step(batch)
        self.assertAllClose(logs["unsup/loss"], expected, atol=1e-5)

    def test_flip_averaged_logits_of_a_mirror_equivariant_network(self):
        # A 1x1 convolution commutes with the flip: the mean of a prediction and
        # its mirrored twin is the prediction, and the result its log-softmax.
        keras.utils.set_random_seed(1)
        inputs = keras.Input((None, None, 3))
        network = keras.Model(inputs, keras.layers.Conv2D(NUM_CLASSES, 1)(inputs))
        images = tf.random.stateless_uniform([2, 5, 7, 3], [1, 2])
        self.assertAllClose(
            flip_averaged_logits(network, images),
            tf.nn.log_softmax(network(images)),
            atol=1e-6,
        )

    def test_flip_target_needs_a_separate_target_pass(self):
        with self.assertRaisesRegex(ValueError, r"--uda_target_flip=True.*--uda_target=shared"):
            dataclasses.replace(UDA_NO_ENT, uda_target_flip=True).validate()
        with self.assertRaisesRegex(ValueError, r"--uda_target_flip=True.*--unsup_ratio=0"):
            dataclasses.replace(UDA_OFF, uda_target="ema", uda_target_flip=True).validate()

    def test_invalid_target_and_entropy_with_a_separate_target_raise(self):
        with self.assertRaisesRegex(ValueError, r"--uda_target='student'"):
            dataclasses.replace(UDA_NO_ENT, uda_target="student").validate()
        with self.assertRaisesRegex(ValueError, r"--ent_min_coeff=0.1 needs --uda_target=shared"):
            dataclasses.replace(UDA_ON, uda_target="ema").validate()


class MixedPrecisionTest(tf.test.TestCase):
    def test_policy_is_bfloat16_without_a_gpu_and_on_tpu(self):
        self.assertEqual(train.mixed_precision_policy(TrainConfig()), "mixed_bfloat16")
        gpu = [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
        with mock.patch.object(tf.config, "list_logical_devices", return_value=gpu):
            self.assertEqual(train.mixed_precision_policy(TrainConfig()), "mixed_float16")
            tpu = TrainConfig(use_tpu=True)
            self.assertEqual(train.mixed_precision_policy(tpu), "mixed_bfloat16")

    def test_a_bfloat16_step_has_the_float32_losses(self):
        batch = make_batch()
        reference = make_model(batch_norm=True).train_step(batch)
        previous = keras.mixed_precision.global_policy()
        try:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            model = make_model(batch_norm=True)
            logs = model.train_step(batch)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self.assertEqual(model.network.get_layer(index=2).compute_dtype, "bfloat16")
        for key in ("sup/loss", "unsup/loss", "unsup/ent_min_loss", "total_loss"):
            self.assertEqual(logs[key].dtype, tf.float32, key)
            self.assertAllClose(logs[key], reference[key], rtol=0.03, msg=key)


class DistributedTest(tf.test.TestCase):
    """Two replicas x half the batch == one replica x the whole batch.

    The network has no BN (per-replica batch statistics would differ from the
    global ones by design); a synchronized-BN variant is checked too. One
    MirroredStrategy serves every test: two instances in one process can
    assign clashing collective keys on the same devices.
    """

    _mirrored = None

    @classmethod
    def mirrored(cls):
        if cls._mirrored is None:
            cls._mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        return cls._mirrored

    def _run(self, strategy, batch, *, uda=UDA_ON, batch_norm=False, custom_loop=False, steps=2):
        with strategy.scope():
            model = make_model(uda, batch_norm=batch_norm)
        if custom_loop:
            with strategy.scope():  # before tracing: no variable creation in the step
                model.optimizer.build(model.network.trainable_variables)
            iterator = iter(strategy.experimental_distribute_dataset(dataset(batch)))
            step = tf.function(model.distributed_train_step)
            logs = [step(next(iterator)) for _ in range(steps)][-1]
        else:
            history = model.fit(dataset(batch), epochs=1, steps_per_epoch=steps, verbose=0)
            logs = {k: v[-1] for k, v in history.history.items()}
        # Each replica sees a different share of the ignored pixels: the
        # confusion matrix must be summed over replicas, not averaged.
        logs["eval/mean_iou"] = model.evaluate(dataset(batch), steps=1, verbose=0)
        weights = weights_of(model) + [w.numpy() for w in model.ema_network.weights]
        return {k: float(v) for k, v in logs.items()}, weights

    def _check_same(self, reference, other):
        ref_logs, ref_weights = reference
        logs, weights = other
        self.assertEqual(set(logs), set(ref_logs))
        for key in ref_logs:
            self.assertAllClose(logs[key], ref_logs[key], atol=1e-5, msg=key)
        for a, b in zip(ref_weights, weights):
            self.assertAllClose(a, b, atol=1e-5)

    _reference = None

    def reference(self):
        """Logs and weights after 2 steps on one device, computed once."""
        if DistributedTest._reference is None:
            DistributedTest._reference = self._run(tf.distribute.get_strategy(), make_batch())
        return DistributedTest._reference

    @pytest.mark.slow  # ~50 s on 2 cores; the custom-loop twin runs by default.
    def test_mirrored_fit_equals_one_device(self):
        self.assertLen(tf.config.list_logical_devices("CPU"), 2)
        self._check_same(self.reference(), self._run(self.mirrored(), make_batch()))

    def test_mirrored_custom_loop_equals_one_device(self):
        mirrored_logs = self._run(self.mirrored(), make_batch(), custom_loop=True)
        self._check_same(self.reference(), mirrored_logs)

    def test_mirrored_cutmix_equals_one_device(self):
        # Partners on the other replica: their targets are gathered over replicas.
        uda = dataclasses.replace(UDA_ON, uda_loss="ce", uda_softmax_temp=-1.0, unsup_mix="cutmix")
        batch = cutmix(make_batch())
        partner = batch[common.MIX_PARTNER]
        self.assertTrue(np.any(partner // 2 != np.arange(4) // 2))
        single = self._run(tf.distribute.get_strategy(), batch, uda=uda)
        self._check_same(single, self._run(self.mirrored(), batch, uda=uda))
        self.assertNotAllClose(single[0]["unsup/loss"], self.reference()[0]["unsup/loss"])

    def test_mirrored_fixed_teacher_equals_one_device(self):
        # The teacher is built in the strategy's scope, as train.build_uda_model loads it.
        uda = with_target(UDA_NO_ENT, "teacher", uda_loss="ce", uda_softmax_temp=-1.0)
        single = self._run(tf.distribute.get_strategy(), make_batch(), uda=uda, custom_loop=True)
        mirrored = self._run(self.mirrored(), make_batch(), uda=uda, custom_loop=True)
        self._check_same(single, mirrored)

    @pytest.mark.slow
    def test_mirrored_equals_one_device_with_synchronized_bn(self):
        batch = make_batch()
        single = self._run(tf.distribute.get_strategy(), batch, batch_norm=True, steps=1)
        mirrored = self.mirrored()
        self._check_same(single, self._run(mirrored, batch, batch_norm=True, steps=1))


if __name__ == "__main__":
    tf.test.main()
