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

With --uda_target=inference, ema or teacher the originals take a forward pass
without gradient, outside the training pass (and no entropy term).
--uda_loss=ce uses hard targets (no sharpening); --unsup_mix=cutmix adds a
CutMix box (a quarter of the crop) and a rolled partner to every unlabeled
image, so that the step mixes the targets as in training.

The model flags are uda_tf.main's (--model_name, --backbone,
--output_stride, --backbone_width, --decoder_filters, --unet_*), so that
a preset's network is timed as it trains (random weights: the same cost).

With --lever=key=value[,key=value] (repeatable; keys LEVER_KEYS), the UDA
step the flags describe is timed against each lever's UDA step instead, all
in this one run with the timings alternating: ms/step, process CPU ms/step
(the steadier figure on a shared machine) and the ratio to the base step.
`--lever=unsup_ratio=0` is the supervised method's step (its B images).

Usage: python -m bench.train_step [--model_name=unet] [--height=64 --width=128]
       [--batch=2 --unsup_ratio=1] [--steps=10] [--modes=eager,function,xla]
       [--uda_target=shared] [--uda_loss=kl] [--unsup_mix=none] [--mixed_precision]
       [--model_name=deeplabv3plus --backbone=mobilenetv2 --backbone_width=0.35
        --decoder_filters=64 --output_stride=16]
"""

import dataclasses
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
from uda_tf.config import UDA_LOSSES, UDA_TARGETS, UNSUP_MIXES, TrainConfig, UdaConfig
from uda_tf.schedules import build_optimizer
from uda_tf.uda_model import UdaModel

_MODEL = flags.DEFINE_enum("model_name", "unet", models.MODEL_NAMES, "Network.")
_BACKBONE = flags.DEFINE_string("backbone", "mobilenetv2", "DeepLab backbone.")
_OUTPUT_STRIDE = flags.DEFINE_integer("output_stride", 16, "DeepLab output stride.")
_BACKBONE_WIDTH = flags.DEFINE_float("backbone_width", 1.0, "DeepLab backbone alpha.")
_DECODER_FILTERS = flags.DEFINE_integer("decoder_filters", 256, "DeepLab ASPP/decoder channels.")
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
_LOSS = flags.DEFINE_enum("uda_loss", "kl", list(UDA_LOSSES), "The consistency divergence.")
_MIX = flags.DEFINE_enum("unsup_mix", "none", list(UNSUP_MIXES), "Mixing of the aug views.")
_FP = flags.DEFINE_float(
    "uda_fp_coeff", 0.0, "UniMatch's feature perturbation pass (DeepLab only); 0 = off."
)
_LEVERS = flags.DEFINE_multi_string(
    "lever",
    [],
    "key=value[,key=value...] (keys: LEVER_KEYS): a variant of the UDA step, timed against "
    "the one the other flags describe in this same run (e.g. --lever=uda_target=ema "
    "--lever=mixed_precision=true --lever=unsup_ratio=0 for the supervised method's step).",
)


# Settings a --lever may change (the bench's flags of the same names).
LEVER_KEYS = (
    "uda_target",
    "uda_loss",
    "unsup_mix",
    "uda_fp_coeff",
    "mixed_precision",
    "backbone_width",
    "decoder_filters",
    "output_stride",
    "height",
    "width",
    "batch",
    "unsup_ratio",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one timed step trains: the network, the images, the UDA options."""

    model_name: str
    backbone: str
    output_stride: int
    backbone_width: float
    decoder_filters: int
    unet_depth: int
    unet_filters: int
    height: int
    width: int
    batch: int
    unsup_ratio: int
    num_classes: int
    uda_target: str
    uda_loss: str
    unsup_mix: str
    uda_fp_coeff: float
    mixed_precision: bool


def setting_from_flags() -> Setting:
    return Setting(**{f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(Setting)})


def parse_lever(text: str, base: Setting) -> Setting:
    """'uda_target=ema,mixed_precision=true' -> `base` with those values.

    Raises:
      ValueError: naming a key outside LEVER_KEYS or a value of the wrong type.
    """
    changes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in LEVER_KEYS:
            raise ValueError(
                f"--lever={text!r}: {item!r} is not key=value with a key in {LEVER_KEYS}."
            )
        kind = type(getattr(base, key))
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--lever={text!r}: {key} takes true or false, got {value!r}.")
            changes[key] = value.lower() == "true"
        else:
            try:
                changes[key] = kind(value)
            except ValueError:
                raise ValueError(
                    f"--lever={text!r}: {key}={value!r} is not {kind.__name__}."
                ) from None
    return dataclasses.replace(base, **changes)


def _batches(setting: Setting):
    """(UDA batch, supervised batch of B(1 + 2r) images)."""
    batch, ratio = setting.batch, setting.unsup_ratio
    height, width = setting.height, setting.width
    rng = np.random.default_rng(0)
    total = batch * (1 + 2 * ratio)
    images = rng.integers(0, 256, (total, height, width, 3), dtype=np.uint8)
    masks = rng.integers(0, setting.num_classes, (total, height, width), dtype=np.uint8)
    masks[:, :4] = common.IGNORE_LABEL
    unsup = batch * ratio
    transforms = np.tile(np.array([[1, 0.1, -3, 0.05, 1, 2, 0, 0]], np.float32), (unsup, 1))
    ori_valid = np.ones((unsup, height, width), np.uint8)
    ori_valid[:, -6:] = 0
    mix = {}
    if setting.unsup_mix != "none" and unsup:
        mix_mask = np.zeros((unsup, height, width), np.uint8)
        mix_mask[:, : height // 2, : width // 2] = 1
        partner = np.roll(np.arange(unsup, dtype=np.int32), 1)
        mix = {common.MIX_MASK: mix_mask, common.MIX_PARTNER: partner}
    uda = {common.IMAGE: images[:batch], common.MASK: masks[:batch]}
    if unsup:
        uda.update(
            {
                common.ORI_IMAGE: images[batch : batch + unsup],
                common.ORI_VALID: ori_valid,
                common.AUG_IMAGE: images[batch + unsup :],
                common.AUG_TRANSFORM: transforms,
                **mix,
            }
        )
    supervised = {common.IMAGE: images, common.MASK: masks}
    to_tensor = lambda d: {k: tf.constant(v) for k, v in d.items()}
    return to_tensor(uda), to_tensor(supervised)


def _model(setting: Setting, unsup_ratio: int) -> UdaModel:
    """The UdaModel of a setting, built under its precision policy."""
    policy = keras.mixed_precision.global_policy()
    if setting.mixed_precision:
        keras.mixed_precision.set_global_policy(train.mixed_precision_policy(TrainConfig()))
    try:
        keras.utils.set_random_seed(0)
        network = models.build_model(
            setting.model_name,
            setting.num_classes,
            backbone=setting.backbone,
            output_stride=setting.output_stride,
            backbone_width=setting.backbone_width,
            decoder_filters=setting.decoder_filters,
            unet_depth=setting.unet_depth,
            unet_filters=setting.unet_filters,
        )
        kl = setting.uda_loss == "kl"
        # --uda_target=teacher: a fixed clone stands in for a finished run's network.
        teacher = keras.models.clone_model(network) if setting.uda_target == "teacher" else None
        uda = UdaConfig(
            unsup_ratio=unsup_ratio,
            tsa="linear_schedule",
            uda_confidence_thresh=0.8,
            uda_softmax_temp=0.4 if kl else -1,
            ent_min_coeff=0.1 if unsup_ratio and setting.uda_target == "shared" else 0.0,
            uda_target=setting.uda_target,
            uda_teacher_dir="a clone" if teacher is not None else "",
            uda_loss=setting.uda_loss if unsup_ratio else "kl",
            unsup_mix=setting.unsup_mix if unsup_ratio else "none",
            uda_fp_coeff=setting.uda_fp_coeff if unsup_ratio else 0.0,
            num_classes=setting.num_classes,
            train_steps=100000,
        )
        model = UdaModel(
            network,
            uda=uda,
            moving_average_decay=0.9999,
            weight_decay_rate=5e-4,
            teacher_network=teacher,
        )
        model.compile(optimizer=build_optimizer(learning_rate=0.01, train_steps=100000))
        model.optimizer.build(network.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return model


def _step_fn(model: UdaModel, mode: str):
    if mode == "eager":
        return model.train_step
    return tf.function(model.train_step, jit_compile=mode == "xla")


def _time(step, batch: dict) -> tuple[float, float]:
    """(wall ms, process CPU ms) per step over --steps steps."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(_STEPS.value):
        logs = step(batch)
    float(logs["total_loss"])  # wait for the device
    wall = (time.perf_counter() - start) / _STEPS.value * 1000.0
    return wall, (time.process_time() - cpu_start) / _STEPS.value * 1000.0


def _median_times(steps_and_batches: list) -> list[tuple[float, float]]:
    """Median (wall, CPU) ms/step of each (step, batch); the timings alternate,
    so that load drifts hit all of them."""
    for step, batch in steps_and_batches:  # trace / compile, warm up
        for _ in range(2):
            float(step(batch)["total_loss"])
    timings = [[] for _ in steps_and_batches]
    for _ in range(_REPEATS.value):
        for i, (step, batch) in enumerate(steps_and_batches):
            timings[i].append(_time(step, batch))
    return [
        (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for ts in timings
    ]


def _describe(setting: Setting, model: UdaModel) -> str:
    num_images = setting.batch * (1 + 2 * setting.unsup_ratio)
    return (
        f"{setting.model_name} ({model.network.count_params()} params), "
        f"{num_images} images of {setting.height}x{setting.width} per step "
        f"(B={setting.batch}, r={setting.unsup_ratio}), {setting.num_classes} classes, "
        f"uda_target {setting.uda_target}, uda_loss {setting.uda_loss}, "
        f"unsup_mix {setting.unsup_mix}, uda_fp_coeff {setting.uda_fp_coeff}, "
        f"{'mixed' if setting.mixed_precision else 'float32'}"
    )


def compare_methods(setting: Setting) -> None:
    """The UDA step vs a supervised step on as many images, per mode."""
    uda_batch, sup_batch = _batches(setting)
    uda_model, sup_model = _model(setting, setting.unsup_ratio), _model(setting, 0)
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(f"{_describe(setting, uda_model)}, devices {devices}")
    print(f"{'mode':<10}{'supervised ms':>15}{'uda ms':>10}{'uda/sup':>10}{'uda CPU ms':>12}")
    for mode in _MODES.value:
        (sup_ms, _), (uda_ms, uda_cpu) = _median_times(
            [(_step_fn(sup_model, mode), sup_batch), (_step_fn(uda_model, mode), uda_batch)]
        )
        print(f"{mode:<10}{sup_ms:>15.1f}{uda_ms:>10.1f}{uda_ms / sup_ms:>10.3f}{uda_cpu:>12.1f}")


def compare_levers(base: Setting, levers: list[str]) -> None:
    """The base UDA step and each lever's, timed alternating in this one run."""
    settings = [("base", base)] + [(text, parse_lever(text, base)) for text in levers]
    runs = []
    for name, setting in settings:
        model = _model(setting, setting.unsup_ratio)
        print(f"{name}: {_describe(setting, model)}")
        runs.append((name, model, _batches(setting)[0]))
    for mode in _MODES.value:
        times = _median_times([(_step_fn(model, mode), batch) for _, model, batch in runs])
        print(f"\n{mode}")
        print(f"{'lever':<48}{'ms/step':>10}{'CPU ms':>10}{'x base':>8}")
        for (name, _, _), (wall, cpu) in zip(runs, times):
            print(f"{name:<48}{wall:>10.1f}{cpu:>10.1f}{wall / times[0][0]:>8.2f}")


def main(argv):
    del argv
    base = setting_from_flags()
    if _LEVERS.value:
        compare_levers(base, _LEVERS.value)
    else:
        compare_methods(base)


if __name__ == "__main__":
    app.run(main)
