"""Cost of the UDA train step against a supervised step on as many images.

Both steps run in this one process on the same network and the same
B(1 + 2r) images per step:
  uda         UdaModel(unsup_ratio=r).train_step: B labeled + rB ori + rB aug,
              TSA, sharpening, confidence mask, warped target, entropy, EMA.
  supervised  UdaModel(unsup_ratio=0).train_step on B(1 + 2r) labeled images
              (cross-entropy only, weight decay and EMA as above).
Each is timed eager, as a tf.function, and as a tf.function with
jit_compile=True (XLA). Inputs are constant tensors (no input pipeline);
ms/step is the median of --repeats timings of --steps steps each, after
warmup, the two steps' timings alternating. Prints the figures and the
uda/supervised ratios (target <= 1.10).

With --uda_target=inference or ema the originals take a forward pass
without gradient, outside the training pass (and no entropy term).

Usage: python -m bench.train_step [--model_name=unet] [--height=64 --width=128]
       [--batch=2 --unsup_ratio=1] [--steps=10] [--modes=eager,function,xla]
       [--uda_target=shared] [--mixed_precision]
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from uda_tf import common, models, train
from uda_tf.config import UDA_TARGETS, TrainConfig, UdaConfig
from uda_tf.schedules import build_optimizer
from uda_tf.uda_model import UdaModel

_MODEL = flags.DEFINE_enum("model_name", "unet", models.MODEL_NAMES, "Network.")
_BACKBONE = flags.DEFINE_string("backbone", "mobilenetv2", "DeepLab backbone.")
_UNET_DEPTH = flags.DEFINE_integer("unet_depth", 3, "U-Net depth.")
_UNET_FILTERS = flags.DEFINE_integer("unet_filters", 16, "U-Net first-level filters.")
_HEIGHT = flags.DEFINE_integer("height", 64, "Crop height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Crop width.")
_BATCH = flags.DEFINE_integer("batch", 2, "Labeled batch B.")
_RATIO = flags.DEFINE_integer("unsup_ratio", 1, "r: rB ori + rB aug images.")
_CLASSES = flags.DEFINE_integer("num_classes", 19, "Classes.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per measurement (median).")
_MODES = flags.DEFINE_list("modes", ["eager", "function", "xla"], "Execution modes.")
_MIXED = flags.DEFINE_bool(
    "mixed_precision", False, "As uda_tf.main's: bfloat16 on CPU and TPU, float16 on GPU."
)
_TARGET = flags.DEFINE_enum(
    "uda_target", "shared", list(UDA_TARGETS), "Where the UDA target comes from."
)


def _batches(batch: int, ratio: int, height: int, width: int, num_classes: int):
    """(UDA batch, supervised batch of B(1 + 2r) images)."""
    rng = np.random.default_rng(0)
    total = batch * (1 + 2 * ratio)
    images = rng.integers(0, 256, (total, height, width, 3), dtype=np.uint8)
    masks = rng.integers(0, num_classes, (total, height, width), dtype=np.uint8)
    masks[:, :4] = common.IGNORE_LABEL
    unsup = batch * ratio
    transforms = np.tile(np.array([[1, 0.1, -3, 0.05, 1, 2, 0, 0]], np.float32), (unsup, 1))
    ori_valid = np.ones((unsup, height, width), np.uint8)
    ori_valid[:, -6:] = 0
    uda = {
        common.IMAGE: images[:batch],
        common.MASK: masks[:batch],
        common.ORI_IMAGE: images[batch : batch + unsup],
        common.ORI_VALID: ori_valid,
        common.AUG_IMAGE: images[batch + unsup :],
        common.AUG_TRANSFORM: transforms,
    }
    supervised = {common.IMAGE: images, common.MASK: masks}
    to_tensor = lambda d: {k: tf.constant(v) for k, v in d.items()}
    return to_tensor(uda), to_tensor(supervised)


def _model(unsup_ratio: int) -> UdaModel:
    keras.utils.set_random_seed(0)
    network = models.build_model(
        _MODEL.value,
        _CLASSES.value,
        backbone=_BACKBONE.value,
        unet_depth=_UNET_DEPTH.value,
        unet_filters=_UNET_FILTERS.value,
    )
    uda = UdaConfig(
        unsup_ratio=unsup_ratio,
        tsa="linear_schedule",
        uda_confidence_thresh=0.8,
        uda_softmax_temp=0.4,
        ent_min_coeff=0.1 if unsup_ratio and _TARGET.value == "shared" else 0.0,
        uda_target=_TARGET.value,
        num_classes=_CLASSES.value,
        train_steps=100000,
    )
    model = UdaModel(network, uda=uda, moving_average_decay=0.9999, weight_decay_rate=5e-4)
    model.compile(optimizer=build_optimizer(learning_rate=0.01, train_steps=100000))
    model.optimizer.build(network.trainable_variables)
    return model


def _step_fn(model: UdaModel, mode: str):
    if mode == "eager":
        return model.train_step
    return tf.function(model.train_step, jit_compile=mode == "xla")


def _time(step, batch: dict) -> float:
    """ms per step over --steps steps."""
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        logs = step(batch)
    float(logs["total_loss"])  # wait for the device
    return (time.perf_counter() - start) / _STEPS.value * 1000.0


def _compare(sup_model: UdaModel, sup_batch: dict, uda_model: UdaModel, uda_batch: dict, mode):
    """Median ms/step of each; the timings alternate, so that load drifts hit both."""
    sup_step, uda_step = _step_fn(sup_model, mode), _step_fn(uda_model, mode)
    for _ in range(2):  # trace / compile, warm up
        float(sup_step(sup_batch)["total_loss"])
        float(uda_step(uda_batch)["total_loss"])
    sup_ms, uda_ms = [], []
    for _ in range(_REPEATS.value):
        sup_ms.append(_time(sup_step, sup_batch))
        uda_ms.append(_time(uda_step, uda_batch))
    return statistics.median(sup_ms), statistics.median(uda_ms)


def main(argv):
    del argv
    if _MIXED.value:
        keras.mixed_precision.set_global_policy(train.mixed_precision_policy(TrainConfig()))
    uda_batch, sup_batch = _batches(
        _BATCH.value, _RATIO.value, _HEIGHT.value, _WIDTH.value, _CLASSES.value
    )
    uda_model, sup_model = _model(_RATIO.value), _model(0)
    num_images = _BATCH.value * (1 + 2 * _RATIO.value)
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(
        f"{_MODEL.value} ({uda_model.network.count_params()} params), "
        f"{num_images} images of {_HEIGHT.value}x{_WIDTH.value} per step "
        f"(B={_BATCH.value}, r={_RATIO.value}), {_CLASSES.value} classes, "
        f"uda_target {_TARGET.value}, {keras.mixed_precision.global_policy().name}, "
        f"devices {devices}"
    )
    print(f"{'mode':<10}{'supervised ms':>15}{'uda ms':>10}{'uda/sup':>10}")
    for mode in _MODES.value:
        sup_ms, uda_ms = _compare(sup_model, sup_batch, uda_model, uda_batch, mode)
        print(f"{mode:<10}{sup_ms:>15.1f}{uda_ms:>10.1f}{uda_ms / sup_ms:>10.3f}")


if __name__ == "__main__":
    app.run(main)
