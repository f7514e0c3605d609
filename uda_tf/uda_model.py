"""UdaModel: the keras.Model whose train_step is UDA's, for fit and custom loops.

One forward pass on concat[labeled, ori, aug] in training mode (BN statistics
shared by the three groups, as the original; with uda_target "inference" or
"ema" the originals go alone, without gradient, through the network or its
EMA in inference mode, with "teacher" through a fixed trained network, and the
training pass is on concat[labeled, aug]), then L_sup (TSA) + unsup_coeff *
L_cons + ent_min_coeff * L_ent + weight decay, SGD, and an EMA of the weights.
With uda_fp_coeff > 0 (DeepLab only), the originals join the training pass,
their backbone features channel-dropped before the head (`FeaturePerturbation`,
UniMatch's), and uda_fp_coeff * L_cons(target, their logits) is added,
unwarped and unmixed.

Distribution. Keras sums the replicas' gradients (TFOptimizer all-reduces with
SUM) and Keras's own losses divide by the number of replicas. Here every
normalised mean is global instead: each replica's loss is its share
local_sum / max(global_count, 1), the counts being summed over replicas
(`losses.replica_sum`), so the summed gradients are those of the global loss
for any split of the batch. The weight decay, the same on every replica, is
divided by the number of replicas. The returned logs are global values, the
same on every replica. With CutMix (MIX_MASK in the batch, partners indexed in
the global unlabeled batch) the warped targets are gathered over replicas
(`losses.replica_concat`) before they are mixed, so partners on another
replica are found.

EMA. As image/main.py (tf.train.ExponentialMovingAverage(decay), no
num_updates): after every step, shadow -= (1 - decay) * (shadow - variable)
for every float variable of the network, trainable ones and BN moving
statistics, shadows starting from the network's weights at construction.
The shadows are the variables of `ema_network`, a clone of the network:
evaluation, predict and export use it directly (no swapping), and it is
saved with the model's weights and checkpoints. decay <= 0 disables it and
`ema_network` is then the network itself.
"""

import math

import keras
import tensorflow as tf
from absl import logging

from uda_tf import common, losses
from uda_tf.config import UdaConfig
from uda_tf.metrics import ConfusionMatrixIoU
from uda_tf.models import deeplabv3plus

# The loss terms of the logs, checked for NaN/Inf every step.
LOSS_LOG_KEYS = ("sup/loss", "unsup/loss", "unsup/fp_loss", "unsup/ent_min_loss", "total_loss")
# The step's share of a feature-dropout seed: seed[1] = step * this + example.
_FP_EXAMPLES_PER_STEP = 1 << 20


def channel_dropout(x: tf.Tensor, rate: float, seeds: tf.Tensor) -> tf.Tensor:
    """Dropout2d: each example loses whole channels with probability `rate`.

    x [N, h, w, C]; seeds int64 [N, 2], one stateless seed per example, so an
    example's mask depends on its seed only (not on the batch it is in or on
    the replica). Kept channels are scaled by 1 / (1 - rate).
    """
    channels = tf.shape(x)[-1]
    keep = tf.map_fn(
        lambda seed: tf.cast(tf.random.stateless_uniform([channels], seed) >= rate, tf.float32),
        seeds,
        fn_output_signature=tf.float32,
    )  # [N, C]
    scale = tf.cast(keep / (1.0 - rate), x.dtype)
    return x * scale[:, tf.newaxis, tf.newaxis, :]


def fp_seeds(seed: int, part: int, step, first, num) -> tf.Tensor:
    """int64 [num, 2]: the dropout seeds of examples first .. first + num - 1
    of the global batch at `step`, [2 * seed + part, step * 2**20 + index]."""
    index = tf.cast(step, tf.int64) * _FP_EXAMPLES_PER_STEP + tf.cast(first, tf.int64)
    index += tf.range(tf.cast(num, tf.int64), dtype=tf.int64)
    return tf.stack([tf.fill(tf.shape(index), tf.constant(2 * seed + part, tf.int64)), index], 1)


class FeaturePerturbation:
    """UniMatch's feature perturbation pass of a DeepLabV3Plus (--uda_fp_coeff).

    UniMatch (model/semseg/deeplabv3plus.py, need_fp) decodes Dropout2d(0.5)
    of the backbone's low- and high-level features; here the same on the
    originals, inside the training pass: features(concat[images, ori]),
    channel_dropout of the originals' part, head(...), all in training
    mode. A plain object, so that Keras does not track the two
    sub-models (which share the network's layers) as more weights.

    The seed of example i of the global batch at step s is [2 * seed + j,
    s * 2**20 + i] (j = 0 low level, 1 high level): a distributed step drops
    the channels a single-device step over the same global batch drops.
    """

    def __init__(self, network: keras.Model, *, rate: float, seed: int):
        self.features, self.head = deeplabv3plus.feature_parts(network)
        self.rate = float(rate)
        self.seed = int(seed)

    def __call__(
        self,
        images: tf.Tensor,
        originals_at,
        num_originals,
        step: tf.Tensor,
        *,
        keep_originals: bool,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(logits of the clean rows, logits of the perturbed originals), one pass.

        `images` is the training batch with the originals at rows
        [originals_at, originals_at + num_originals). The backbone runs on it
        once and the head on its features and the originals' dropped ones, so
        that BN sees one batch of each layer per step (UniMatch decodes
        concat[clean, dropped] the same way), and each layer's gradient is
        one chain: two training passes through synchronized BN in one step
        pair the replicas' backward all-reduces in no fixed order. With
        keep_originals False the originals must be the last rows and only
        the rows before them are decoded clean (their target comes from
        elsewhere).
        """
        end = originals_at + num_originals
        low, high = self.features(images, training=True)
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        first = tf.cast(replica, tf.int64) * tf.cast(num_originals, tf.int64)
        clean_rows = slice(None) if keep_originals else slice(None, originals_at)
        parts = []
        for part, feature in enumerate((low, high)):
            seeds = fp_seeds(self.seed, part, step, first, num_originals)
            dropped = channel_dropout(feature[originals_at:end], self.rate, seeds)
            parts.append(tf.concat([feature[clean_rows], dropped], 0))
        clean_images = images[clean_rows]
        shapes = tf.concat([clean_images, images[originals_at:end]], 0)
        logits = self.head(parts + [shapes], training=True)
        num_clean = tf.shape(clean_images)[0]
        return logits[:num_clean], logits[num_clean:]


def apply_weight_decay(network: keras.Model, weight_decay_rate: float) -> int:
    """Adds 1/2 * wd * ||v||^2 of every trainable variable to `network.losses`.

    As the original's l2 over all trainable variables (BN and biases
    included): sets `keras.regularizers.L2(wd / 2)` (which computes
    l2 * sum(v^2)) as the regularizer of each trainable variable; Keras 3
    layers add `variable.regularizer(variable)` of their trainable weights to
    `losses`. Call it after the network is built.

    Args:
      network: a built keras.Model.
      weight_decay_rate: wd (--weight_decay_rate); 0 removes the regularizers.

    Returns:
      The number of variables regularised.

    Raises:
      ValueError: for a negative rate or an unbuilt network.
    """
    if weight_decay_rate < 0:
        raise ValueError(f"--weight_decay_rate={weight_decay_rate!r} is invalid: expected >= 0.")
    if not network.built:
        raise ValueError(f"Network {network.name!r} must be built before apply_weight_decay.")
    regularizer = keras.regularizers.L2(weight_decay_rate / 2.0) if weight_decay_rate else None
    for variable in network.trainable_variables:
        variable.regularizer = regularizer
    return len(network.trainable_variables)


class TerminateOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` with the step and every loss term when one is NaN/Inf.

    The train step already asserts this in-graph; XLA drops that assertion
    (jit_compile), so this callback catches it from the logs, after the
    execution (`steps_per_execution` steps) that produced it.
    """

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        terms = {k: float(logs[k]) for k in LOSS_LOG_KEYS if k in logs}
        if not all(math.isfinite(v) for v in terms.values()):
            step = int(self.model.optimizer.iterations.numpy())
            raise FloatingPointError(f"Non-finite loss at step {step}: {terms}")


class UdaModel(keras.Model):
    """UDA training around a segmentation network.

    Args:
      network: a built keras.Model from float32 images [N, H, W, 3] in
        [0, 255] to logits [N, H, W, K].
      uda: the method's knobs (unsup_ratio, tsa, ..., train_steps).
      moving_average_decay: EMA decay; <= 0 disables the EMA.
      weight_decay_rate: if > 0, `apply_weight_decay(network, rate)`.
      ema_network: optional network of the same architecture to hold the EMA
        shadows (default: keras.models.clone_model(network)).
      teacher_network: with uda.uda_target "teacher" (and only then), the
        trained network whose inference-mode logits are the targets; it is
        never updated, and not part of the model's weights or checkpoints.
      **kwargs: for keras.Model (name, ...).

    Raises:
      ValueError: for an invalid `uda`, an unbuilt network, an `ema_network`
        whose weights do not match the network's, or a `teacher_network`
        given without uda_target "teacher" (or missing with it).
    """

    def __init__(
        self,
        network: keras.Model,
        *,
        uda: UdaConfig,
        moving_average_decay: float = 0.9999,
        weight_decay_rate: float = 0.0,
        ema_network: keras.Model | None = None,
        teacher_network: keras.Model | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        uda.validate()
        if not network.built:
            raise ValueError(f"Network {network.name!r} must be built before UdaModel.")
        if (teacher_network is None) == (uda.uda_target == "teacher"):
            raise ValueError(
                f"--uda_target={uda.uda_target} needs a teacher network exactly when it is "
                f"'teacher'; got teacher_network={teacher_network!r}."
            )
        self.uda_config = uda
        self.network = network
        self.moving_average_decay = float(moving_average_decay)
        if weight_decay_rate:
            apply_weight_decay(network, weight_decay_rate)
        self._ema_network = None
        if self.moving_average_decay > 0:
            self._ema_network = ema_network or keras.models.clone_model(network)
            self._ema_network.trainable = False
            pairs = _float_weight_pairs(self._ema_network, network)
            logging.info("EMA over %d float weights of %s.", len(pairs), network.name)
            self.copy_weights_to_ema()
        self._teacher = _Untracked(teacher_network)
        self._feature_perturbation = None
        if uda.uda_fp_coeff > 0:
            self._feature_perturbation = FeaturePerturbation(
                network, rate=uda.uda_fp_dropout, seed=uda.seed
            )
        self.iou_metric = ConfusionMatrixIoU(uda.num_classes, ignore_label=uda.ignore_label)
        self.built = True

    @property
    def ema_network(self) -> keras.Model:
        """The network holding the EMA weights (the network if EMA is off)."""
        return self._ema_network if self._ema_network is not None else self.network

    @property
    def teacher_network(self) -> keras.Model:
        """The network whose inference-mode logits are the targets (--uda_target).

        The EMA network for "ema", the fixed teacher for "teacher", else the network.
        """
        target = self.uda_config.uda_target
        if target == "teacher":
            return self._teacher.value
        return self.ema_network if target == "ema" else self.network

    @property
    def metrics(self):
        return [self.iou_metric]

    def copy_weights_to_ema(self) -> None:
        """Sets the shadows to the network's weights (e.g. after loading them)."""
        if self._ema_network is not None:
            for shadow, variable in _float_weight_pairs(self._ema_network, self.network):
                shadow.assign(variable)

    def call(self, inputs, training=False):
        images = inputs[common.IMAGE] if isinstance(inputs, dict) else inputs
        images = tf.cast(images, tf.float32)
        if training:
            return self.network(images, training=True)
        return self.ema_network(images, training=False)

    def train_step(self, data):
        """One UDA step; runs per replica (Keras fit or `strategy.run`).

        Args:
          data: the batch dict of uda_tf.common (IMAGE, MASK; and ORI_IMAGE,
            AUG_IMAGE, optionally ORI_VALID and AUG_TRANSFORM when
            unsup_ratio > 0; MIX_MASK and MIX_PARTNER with CutMix, whose
            targets are then mixed too), this replica's part of it.

        Returns:
          dict of float32 scalars, global over replicas: sup/loss,
          sup/tsa_threshold, sup/trained_ratio, [unsup/loss,
          unsup/high_prob_ratio, [unsup/ent_min_loss]], total_loss, lr.
        """
        if not self.optimizer.built and not tf.distribute.has_strategy():
            # Keras defers this to the trace without a strategy; XLA cannot
            # lift the slots' creation out of it (jit_compile fails).
            with tf.init_scope():
                self.optimizer.build(self.network.trainable_variables)
        step = self.optimizer.iterations
        progress = tf.cast(step, tf.float32) / float(self.uda_config.train_steps)
        images, target_images = self._forward_images(data)
        target_logits = None
        if target_images is not None:
            teacher = self.teacher_network
            if self.uda_config.uda_target_flip:
                target_logits = flip_averaged_logits(teacher, target_images)
            else:
                target_logits = tf.cast(teacher(target_images, training=False), tf.float32)
            target_logits = tf.stop_gradient(target_logits)
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            fp_logits = None
            if self._feature_perturbation is None:
                logits = self.network(images, training=True)
            elif target_images is None:
                # "shared": the originals follow the labeled images in the pass.
                logits, fp_logits = self._feature_perturbation(
                    images,
                    tf.shape(data[common.IMAGE])[0],
                    tf.shape(data[common.ORI_IMAGE])[0],
                    step,
                    keep_originals=True,
                )
            else:
                logits, fp_logits = self._feature_perturbation(
                    tf.concat([images, target_images], 0),
                    tf.shape(images)[0],
                    tf.shape(target_images)[0],
                    step,
                    keep_originals=False,
                )
            shares, coeffs, logs = self._loss_terms(
                data, logits, progress, target_logits, fp_logits
            )
            shares["weight_decay"] = self._weight_decay_share()
            coeffs["weight_decay"] = 1.0
            loss = tf.add_n([coeffs[k] * shares[k] for k in shares])
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        learning_rate = tf.identity(self.optimizer.learning_rate)
        global_terms = _global_values(shares)
        logs.update({k: v for k, v in global_terms.items() if k != "weight_decay"})
        logs["total_loss"] = tf.add_n([coeffs[k] * global_terms[k] for k in global_terms])
        check = _assert_finite(step, logs)
        with tf.control_dependencies([check] if check is not None else []):
            self.optimizer.apply(gradients, variables)
        self._update_ema()
        logs["lr"] = tf.cast(learning_rate, tf.float32)
        return logs

    def test_step(self, data):
        """Updates the confusion matrix on {IMAGE, MASK} with the EMA weights."""
        if isinstance(data, (tuple, list)):
            images, labels = data[0], data[1]
        else:
            images, labels = data[common.IMAGE], data[common.MASK]
        logits = self(images, training=False)
        self.iou_metric.update_state(labels, logits)
        # The same keys as `metrics`: Keras then reads the result in a
        # cross-replica context, where the replicas' counts are summed.
        return {self.iou_metric.name: self.iou_metric.result()}

    def distributed_train_step(self, data):
        """`train_step` on every replica, for custom loops (call in tf.function).

        Keras's fit does not run under MultiWorkerMirroredStrategy
        (tensorflow/tensorflow#72388); a loop over
        `strategy.experimental_distribute_dataset(...)` calls this instead.
        Builds the optimizer's variables on first use.

        Args:
          data: a distributed batch (per-replica values of the batch dict).

        Returns:
          The logs of `train_step` as plain tensors.
        """
        strategy = self.distribute_strategy
        if not self.optimizer.built:
            with tf.init_scope(), strategy.scope():  # eagerly, even when traced
                self.optimizer.build(self.network.trainable_variables)
        per_replica = strategy.run(self.train_step, args=(data,))
        # Every replica returns the same global values.
        return {
            k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
            for k, v in per_replica.items()
        }

    def _forward_images(self, data) -> tuple[tf.Tensor, tf.Tensor | None]:
        """(training-pass images, target-pass images or None), float32.

        uda_target "shared": (concat[labeled, ori, aug], None), B(1 + 2r)
        images in one pass. Otherwise (concat[labeled, aug], ori). Without
        UDA: (labeled, None).
        """
        keys = [common.IMAGE]
        if self.uda_config.unsup_ratio > 0:
            keys += [common.ORI_IMAGE, common.AUG_IMAGE]
        needed = keys + [common.MASK]
        if self.uda_config.unsup_mix != "none":
            needed += [common.MIX_MASK, common.MIX_PARTNER]
        missing = [k for k in needed if k not in data]
        if missing:
            raise ValueError(
                f"The training batch lacks {missing} (--unsup_ratio="
                f"{self.uda_config.unsup_ratio}, --unsup_mix={self.uda_config.unsup_mix}); "
                f"it has {sorted(data)}."
            )
        target = None
        if self.uda_config.unsup_ratio > 0 and self.uda_config.uda_target != "shared":
            keys.remove(common.ORI_IMAGE)
            target = tf.cast(data[common.ORI_IMAGE], tf.float32)
        return tf.concat([tf.cast(data[k], tf.float32) for k in keys], axis=0), target

    def _loss_terms(self, data, logits, progress, target_logits=None, fp_logits=None):
        """(this replica's loss shares, their coefficients, other logs).

        `logits` are the training pass's; `target_logits` the originals' from
        a separate pass (None: they are in `logits`, after the labeled ones);
        `fp_logits` the feature-perturbed pass on the originals, or None.
        """
        cfg = self.uda_config
        sup_size = tf.shape(data[common.IMAGE])[0]
        sup = losses.supervised_loss(
            logits=logits[:sup_size],
            labels=data[common.MASK],
            num_classes=cfg.num_classes,
            ignore_label=cfg.ignore_label,
            tsa=cfg.tsa,
            progress=progress,
            global_sum_fn=losses.replica_sum,
        )
        shares, coeffs = {"sup/loss": sup["loss"]}, {"sup/loss": 1.0}
        logs = {"sup/tsa_threshold": sup["threshold"], "sup/trained_ratio": sup["trained_ratio"]}
        if cfg.unsup_ratio == 0:
            return shares, coeffs, logs
        unsup_size = tf.shape(data[common.ORI_IMAGE])[0]
        if target_logits is None:
            ori_logits = logits[sup_size : sup_size + unsup_size]
            aug_logits = logits[sup_size + unsup_size :]
        else:
            ori_logits, aug_logits = target_logits, logits[sup_size:]
        ori_valid = data.get(common.ORI_VALID)
        cons = losses.consistency_loss(
            ori_logits=ori_logits,
            aug_logits=aug_logits,
            softmax_temp=cfg.uda_softmax_temp,
            confidence_thresh=cfg.uda_confidence_thresh,
            transforms=data.get(common.AUG_TRANSFORM),
            ori_valid=ori_valid,
            uda_loss=cfg.uda_loss,
            mix_mask=data.get(common.MIX_MASK),
            mix_partner=data.get(common.MIX_PARTNER),
            global_sum_fn=losses.replica_sum,
            global_concat_fn=losses.replica_concat,
        )
        shares["unsup/loss"], coeffs["unsup/loss"] = cons["loss"], float(cfg.unsup_coeff)
        logs["unsup/high_prob_ratio"] = cons["high_prob_ratio"]
        if fp_logits is not None:
            # The same target and mask, in the originals' own frame: unwarped, unmixed.
            fp = losses.consistency_loss(
                ori_logits=ori_logits,
                aug_logits=fp_logits,
                softmax_temp=cfg.uda_softmax_temp,
                confidence_thresh=cfg.uda_confidence_thresh,
                ori_valid=ori_valid,
                uda_loss=cfg.uda_loss,
                global_sum_fn=losses.replica_sum,
            )
            shares["unsup/fp_loss"], coeffs["unsup/fp_loss"] = fp["loss"], cfg.uda_fp_coeff
        if cfg.ent_min_coeff > 0:
            ent = losses.entropy_loss(
                logits=ori_logits, valid=ori_valid, global_sum_fn=losses.replica_sum
            )
            shares["unsup/ent_min_loss"] = ent["loss"]
            coeffs["unsup/ent_min_loss"] = float(cfg.ent_min_coeff)
        return shares, coeffs, logs

    def _weight_decay_share(self) -> tf.Tensor:
        """sum(network.losses) / replicas (the same on each; gradients are summed).

        The network's losses, not the UdaModel's: those would also collect
        stale `add_loss` values of the EMA network's last (eval) call.
        """
        network_losses = self.network.losses
        if not network_losses:
            return tf.constant(0.0)
        ctx = tf.distribute.get_replica_context()
        num_replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        total = tf.add_n([tf.cast(x, tf.float32) for x in network_losses])
        return total / float(num_replicas)

    def _update_ema(self) -> None:
        """shadow -= (1 - decay) * (shadow - variable), after the step."""
        if self._ema_network is None:
            return
        decay = self.moving_average_decay
        for shadow, variable in _float_weight_pairs(self._ema_network, self.network):
            shadow.assign_sub((1.0 - decay) * (shadow - tf.cast(variable, shadow.dtype)))


class _Untracked:
    """Holds a value out of sight of Keras's and tf.train's attribute tracking,
    so that a fixed teacher's weights are not the model's (not trained, averaged
    or saved)."""

    def __init__(self, value):
        self.value = value


def flip_averaged_logits(network: keras.Model, images: tf.Tensor) -> tf.Tensor:
    """float32 [N, H, W, C]: log of the mean of the inference-mode probabilities on
    `images` and on their mirror images (flipped back), so that a softmax of the
    result (at any temperature) is a test-time-augmented target.
    """
    # One inference pass over both: BN uses its moving statistics, so batching
    # them together changes nothing but the number of calls.
    both = tf.concat([images, tf.reverse(images, [2])], 0)
    logits, mirrored = tf.split(tf.cast(network(both, training=False), tf.float32), 2)
    log_probs = tf.stack([tf.nn.log_softmax(logits), tf.nn.log_softmax(tf.reverse(mirrored, [2]))])
    return tf.reduce_logsumexp(log_probs, axis=0) - tf.math.log(2.0)


def _float_weight_pairs(ema_network: keras.Model, network: keras.Model) -> list:
    """(shadow, variable) for every float weight, in the networks' order."""
    shadows, variables = ema_network.weights, network.weights
    if len(shadows) != len(variables) or any(
        tuple(s.shape) != tuple(v.shape) for s, v in zip(shadows, variables)
    ):
        raise ValueError(
            f"ema_network {ema_network.name!r} does not have the weights of network "
            f"{network.name!r} ({len(shadows)} vs {len(variables)} weights)."
        )
    return [(s, v) for s, v in zip(shadows, variables) if "float" in str(v.dtype)]


def _global_values(shares: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Sums each replica's share over replicas, in one all-reduce."""
    keys = sorted(shares)
    summed = losses.replica_sum(tf.stack([tf.cast(shares[k], tf.float32) for k in keys]))
    return dict(zip(keys, tf.unstack(summed)))


def _assert_finite(step, logs: dict[str, tf.Tensor]):
    """Fails the step, naming it and every term, if a loss is NaN or Inf."""
    names = [k for k in LOSS_LOG_KEYS if k in logs]
    values = tf.stack([logs[k] for k in names])
    data = ["Non-finite loss at step", step]
    for name in names:
        data += [name, logs[name]]
    return tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(values)), data, summarize=16)
