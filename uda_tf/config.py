"""Frozen run configuration, built once from flags by flags/uda_flags.py.

Field names are the flag names (the original UDA's where it had one), so that
an error can name the flag. `Config.to_dict()` is what main.py writes to
model_dir/FLAGS.json; `Config.from_dict()` reads it back (export, resume).
"""

import dataclasses
import re
from typing import Any

TSA_SCHEDULES = ("", "linear_schedule", "log_schedule", "exp_schedule")
TASK_NAMES = ("cityscapes", "camvid", "custom")
MODEL_NAMES = ("deeplabv3plus", "unet")
BACKBONES = (
    "resnet50",
    "resnet101",
    "mobilenetv1",
    "mobilenetv2",
    "mobilenetv2_torchvision",
    "xception",
)
# The widths (alpha) that keras.applications has ImageNet files for; ResNet
# and Xception have none but 1.0. Checked only with such a legacy .h5 file.
BACKBONE_WIDTHS = {
    "resnet50": (1.0,),
    "resnet101": (1.0,),
    "mobilenetv1": (0.25, 0.5, 0.75, 1.0),
    "mobilenetv2": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    "mobilenetv2_torchvision": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    "xception": (1.0,),
}
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
AUG_OPS = ("all", "photometric")
# --data_service_address: [grpc://]host:port of a tf.data service dispatcher.
DATA_SERVICE_ADDRESS = r"(grpc://)?([^:/\s]+|\[[0-9a-fA-F:]+\]):([1-9][0-9]{0,4})"
# Where the consistency target on the originals comes from (UdaConfig.uda_target).
UDA_TARGETS = ("shared", "inference", "ema", "teacher")
# The consistency divergence (UdaConfig.uda_loss): "kl" to the soft target (the
# original), "ce" to its argmax (FixMatch / UniMatch hard targets).
UDA_LOSSES = ("kl", "ce")
# Mixing between the unlabeled images' aug views (augment/mix.py).
UNSUP_MIXES = ("none", "cutmix")
# The strong view's policy: UDA's RandAugment, or UniMatch's colour view (augment/color.py).
AUG_POLICIES = ("randaugment", "color")
# The colour view's hue jitter, UniMatch's ColorJitter(hue=0.25) (augment.color.HUE).
COLOR_HUE = 0.25
# The colour view's blur sigma range in pixels, UniMatch's (0.1, 2.0)
# (augment.color.SIGMA_RANGE), set for crops of 321 to 801 pixels; the top is
# a flag, so that smaller frames can blur as much relative to their size.
COLOR_MIN_SIGMA = 0.1
COLOR_MAX_SIGMA = 2.0


def _check(ok: bool, flag: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"--{flag}={value!r} is invalid: expected {expected}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how the two streams are cut and augmented."""

    task_name: str = "cityscapes"
    data_dir: str | None = None
    # auto | folder | tfrecord | tfds | camvid | simple (see uda_tf/data/sources.py)
    data_source: str = "auto"
    sup_size: int = -1
    # The original preprocess.py's flag: balance the labeled subset over
    # groups (Cityscapes cities, CamVid sequences); see uda_tf/data/base.py.
    use_equal_split: bool = False
    unsup_ratio: int = 0
    # Add leftImg8bit_trainextra to the unlabeled pool (Cityscapes only).
    use_train_extra: bool = False
    # Extra folder of unlabeled images (the simple layout, your own data).
    unlabeled_dir: str | None = None
    train_batch_size: int = 32
    eval_batch_size: int = 8
    eval_split: str = "val"
    dev_size: int = -1
    # Resize every image (and mask, nearest) by this factor right after
    # decoding: a cheaper, lower-resolution task. Evaluation resizes the
    # network's input only and scores at the labels' stored size, unless
    # eval_at_stored_size is False (then the masks are resized too).
    resize_factor: float = 1.0
    eval_at_stored_size: bool = True
    crop_height: int = 512
    crop_width: int = 1024
    min_scale: float = 0.5
    max_scale: float = 2.0
    num_classes: int = 19
    ignore_label: int = 255
    seed: int = 0
    shuffle_buffer: int = 1000
    # The tf.data service dispatcher (grpc://host:port) whose workers make the
    # training batches (uda_tf/data/service.py); None = local input.
    data_service_address: str | None = None
    # The unlabeled aug view: "randaugment" (UDA's, the knobs below) or "color".
    aug_policy: str = "randaugment"
    # CutMix between the unlabeled aug views of a batch: "none" or "cutmix".
    unsup_mix: str = "none"
    # RandAugment of the unlabeled aug view.
    aug_ops: str = "all"
    aug_num_layers: int = 2
    aug_prob: float = 0.5
    aug_cutout: bool = True
    # The colour view's hue shift is uniform in [-aug_color_hue, aug_color_hue].
    aug_color_hue: float = COLOR_HUE
    # The colour view's blur sigma is uniform in [0.1, aug_color_max_sigma] pixels.
    aug_color_max_sigma: float = COLOR_MAX_SIGMA
    # Also RandAugment the labeled crops (jointly with their masks).
    sup_randaugment: bool = False

    def validate(self) -> None:
        _check(self.task_name in TASK_NAMES, "task_name", self.task_name, str(TASK_NAMES))
        _check(self.sup_size == -1 or self.sup_size > 0, "sup_size", self.sup_size, "-1 or > 0")
        _check(self.unsup_ratio >= 0, "unsup_ratio", self.unsup_ratio, ">= 0")
        _check(self.train_batch_size > 0, "train_batch_size", self.train_batch_size, "> 0")
        _check(self.eval_batch_size > 0, "eval_batch_size", self.eval_batch_size, "> 0")
        address = self.data_service_address
        _check(
            address is None or re.fullmatch(DATA_SERVICE_ADDRESS, address) is not None,
            "data_service_address",
            address,
            "grpc://host:port or host:port (a tf.data service dispatcher), or None",
        )
        _check(0 < self.resize_factor <= 4, "resize_factor", self.resize_factor, "in (0, 4]")
        _check(self.crop_height > 0, "crop_height", self.crop_height, "> 0")
        _check(self.crop_width > 0, "crop_width", self.crop_width, "> 0")
        _check(0 < self.min_scale, "min_scale", self.min_scale, "> 0")
        _check(self.min_scale <= self.max_scale, "max_scale", self.max_scale, ">= --min_scale")
        _check(self.num_classes > 1, "num_classes", self.num_classes, "> 1")
        _check(0 <= self.ignore_label <= 255, "ignore_label", self.ignore_label, "in [0, 255]")
        _check(
            self.ignore_label >= self.num_classes,
            "ignore_label",
            self.ignore_label,
            f">= --num_classes={self.num_classes}",
        )
        _check(self.aug_ops in AUG_OPS, "aug_ops", self.aug_ops, str(AUG_OPS))
        _check(self.aug_policy in AUG_POLICIES, "aug_policy", self.aug_policy, str(AUG_POLICIES))
        if self.aug_policy != "randaugment":
            # RandAugment's own knobs mean nothing to another policy.
            for flag, value, default in (
                ("aug_ops", self.aug_ops, "all"),
                ("aug_num_layers", self.aug_num_layers, 2),
            ):
                _check(
                    value == default,
                    flag,
                    value,
                    f"its default with --aug_policy={self.aug_policy} (a RandAugment knob)",
                )
        _check(self.unsup_mix in UNSUP_MIXES, "unsup_mix", self.unsup_mix, str(UNSUP_MIXES))
        if self.unsup_mix != "none" and self.unsup_ratio * self.train_batch_size < 2:
            raise ValueError(
                f"--unsup_mix={self.unsup_mix} needs at least 2 unlabeled images per batch: "
                f"--unsup_ratio={self.unsup_ratio} x --train_batch_size={self.train_batch_size}."
            )
        _check(self.aug_num_layers >= 0, "aug_num_layers", self.aug_num_layers, ">= 0")
        _check(0.0 <= self.aug_prob <= 1.0, "aug_prob", self.aug_prob, "in [0, 1]")
        _check(0.0 <= self.aug_color_hue <= 0.5, "aug_color_hue", self.aug_color_hue, "in [0, 0.5]")
        _check(
            self.aug_policy == "color" or self.aug_color_hue == COLOR_HUE,
            "aug_color_hue",
            self.aug_color_hue,
            f"its default {COLOR_HUE} with --aug_policy={self.aug_policy} (a colour-view knob)",
        )
        _check(
            self.aug_color_max_sigma >= COLOR_MIN_SIGMA,
            "aug_color_max_sigma",
            self.aug_color_max_sigma,
            f">= {COLOR_MIN_SIGMA} (the blur's smallest sigma)",
        )
        _check(
            self.aug_policy == "color" or self.aug_color_max_sigma == COLOR_MAX_SIGMA,
            "aug_color_max_sigma",
            self.aug_color_max_sigma,
            f"its default {COLOR_MAX_SIGMA} with --aug_policy={self.aug_policy} (a colour-view knob)",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network; U-Net ignores the DeepLab fields and vice versa."""

    model_name: str = "deeplabv3plus"
    num_classes: int = 19
    backbone: str = "resnet50"
    output_stride: int = 16
    backbone_weights: str | None = None
    # DeepLab backbone channel multiplier (the MobileNets' alpha) and
    # ASPP/decoder channels.
    backbone_width: float = 1.0
    decoder_filters: int = 256
    unet_depth: int = 4
    unet_filters: int = 64
    # Batch statistics averaged across replicas (keras BatchNormalization
    # synchronized=True), for small per-replica batches.
    synchronized_bn: bool = False

    def validate(self) -> None:
        _check(self.model_name in MODEL_NAMES, "model_name", self.model_name, str(MODEL_NAMES))
        _check(self.backbone in BACKBONES, "backbone", self.backbone, str(BACKBONES))
        _check(self.output_stride in (8, 16), "output_stride", self.output_stride, "8 or 16")
        _check(self.backbone_width > 0, "backbone_width", self.backbone_width, "> 0")
        _check(self.decoder_filters >= 1, "decoder_filters", self.decoder_filters, ">= 1")
        # A keras.applications (legacy .h5) file exists at a few widths only; a
        # .weights.h5 file (Keras 3, saved from our backbone) may have any.
        legacy_file = self.backbone_weights and not self.backbone_weights.endswith(".weights.h5")
        if self.model_name == "deeplabv3plus" and legacy_file:
            widths = BACKBONE_WIDTHS[self.backbone]
            _check(
                self.backbone_width in widths,
                "backbone_width",
                self.backbone_width,
                f"one of {widths} with --backbone={self.backbone} and the keras.applications "
                f"file --backbone_weights={self.backbone_weights!r}",
            )
        _check(self.unet_depth >= 1, "unet_depth", self.unet_depth, ">= 1")
        _check(self.unet_filters >= 1, "unet_filters", self.unet_filters, ">= 1")


@dataclasses.dataclass(frozen=True)
class UdaConfig:
    """The method's knobs, with the original's names and sentinels."""

    unsup_ratio: int = 0
    tsa: str = ""
    uda_confidence_thresh: float = -1.0
    uda_softmax_temp: float = -1.0
    ent_min_coeff: float = 0.0
    unsup_coeff: float = 1.0
    # "shared": one training-mode pass on concat[labeled, ori, aug], BN
    # statistics shared by the three groups (the original). "inference": the
    # originals go through the network alone in inference mode (BN moving
    # statistics). "ema": the same through the EMA network (a mean teacher).
    uda_target: str = "shared"
    # With "inference", "ema" or "teacher": the target is the mean of the teacher's
    # probabilities on the originals and on their mirror images (flipped back),
    # a test-time-augmented pseudo-label as Naive-Student's.
    uda_target_flip: bool = False
    # With uda_target "teacher": the run directory whose newest intact
    # checkpoint's EMA network gives the targets, fixed for the whole run
    # (self-training from a trained teacher, as Noisy Student and ST++).
    uda_teacher_dir: str = ""
    # "kl": KL to the soft target (the original). "ce": cross-entropy to the
    # argmax of the unsharpened target (FixMatch / UniMatch), same mask M.
    uda_loss: str = "kl"
    # "cutmix": the batch carries MIX_MASK / MIX_PARTNER and the targets are
    # mixed as the aug views were (augment/mix.py).
    unsup_mix: str = "none"
    # UniMatch's feature perturbation: > 0 adds uda_fp_coeff x the same
    # consistency loss between the target and a training pass on the originals
    # whose backbone features (DeepLab's low and high level) lose whole
    # channels with probability uda_fp_dropout (Dropout2d); 0 = off.
    uda_fp_coeff: float = 0.0
    uda_fp_dropout: float = 0.5
    # Seeds the feature dropout (the run's --seed).
    seed: int = 0
    num_classes: int = 19
    ignore_label: int = 255
    # Denominator of TSA progress (and of the LR schedule).
    train_steps: int = 100000

    def validate(self) -> None:
        _check(self.tsa in TSA_SCHEDULES, "tsa", self.tsa, str(TSA_SCHEDULES))
        _check(
            self.uda_confidence_thresh == -1 or 0 <= self.uda_confidence_thresh < 1,
            "uda_confidence_thresh",
            self.uda_confidence_thresh,
            "-1 (off) or in [0, 1)",
        )
        _check(
            self.uda_softmax_temp == -1 or self.uda_softmax_temp > 0,
            "uda_softmax_temp",
            self.uda_softmax_temp,
            "-1 (off) or > 0",
        )
        _check(self.ent_min_coeff >= 0, "ent_min_coeff", self.ent_min_coeff, ">= 0")
        _check(self.unsup_coeff >= 0, "unsup_coeff", self.unsup_coeff, ">= 0")
        _check(self.uda_target in UDA_TARGETS, "uda_target", self.uda_target, str(UDA_TARGETS))
        if self.uda_target != "shared" and self.ent_min_coeff > 0:
            raise ValueError(
                f"--ent_min_coeff={self.ent_min_coeff} needs --uda_target=shared: the entropy "
                f"term trains through the originals' pass, which --uda_target="
                f"{self.uda_target} runs without gradient."
            )
        if (self.uda_target == "teacher") != bool(self.uda_teacher_dir):
            raise ValueError(
                f"--uda_target={self.uda_target} contradicts --uda_teacher_dir="
                f"{self.uda_teacher_dir!r}: the teacher's run directory goes with "
                "--uda_target=teacher, and only with it."
            )
        if self.uda_target_flip and self.uda_target == "shared":
            raise ValueError(
                "--uda_target_flip=True needs --uda_target=inference, ema or teacher, not "
                "--uda_target=shared: the mirrored originals need a teacher pass of their own."
            )
        _check(self.uda_loss in UDA_LOSSES, "uda_loss", self.uda_loss, str(UDA_LOSSES))
        _check(self.unsup_mix in UNSUP_MIXES, "unsup_mix", self.unsup_mix, str(UNSUP_MIXES))
        if self.unsup_ratio == 0:
            for flag, value, off in (
                ("uda_loss", self.uda_loss, "kl"),
                ("unsup_mix", self.unsup_mix, "none"),
                ("uda_target_flip", self.uda_target_flip, False),
            ):
                _check(
                    value == off, flag, value, f"{off!r} with --unsup_ratio=0 (no unlabeled data)"
                )
        if self.uda_loss == "ce" and self.uda_softmax_temp != -1:
            raise ValueError(
                f"--uda_loss=ce contradicts --uda_softmax_temp={self.uda_softmax_temp}: a hard "
                "target is the argmax, which a temperature does not change; use -1."
            )
        _check(self.uda_fp_coeff >= 0, "uda_fp_coeff", self.uda_fp_coeff, ">= 0")
        _check(0 < self.uda_fp_dropout < 1, "uda_fp_dropout", self.uda_fp_dropout, "in (0, 1)")
        if self.uda_fp_coeff > 0 and self.unsup_ratio == 0:
            raise ValueError(
                f"--uda_fp_coeff={self.uda_fp_coeff} needs unlabeled data: --unsup_ratio > 0."
            )
        _check(self.train_steps > 0, "train_steps", self.train_steps, "> 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, checkpoints and the run's machinery."""

    model_dir: str | None = None
    do_train: bool = True
    do_eval: bool = False
    dev_size: int = -1
    train_steps: int = 100000
    iterations: int = 10000
    save_steps: int = 10000
    max_save: int = 10
    learning_rate: float = 0.03
    weight_decay_rate: float = 5e-4
    warmup_steps: int = 0
    moving_average_decay: float = 0.9999
    strategy: str = "default"
    use_tpu: bool = False
    master: str | None = None
    tpu: str | None = None
    gcp_project: str | None = None
    tpu_zone: str | None = None
    mixed_precision: bool = False
    jit_compile: bool = False
    seed: int = 0
    deterministic: bool = False
    verbose: bool = False
    # Validation images shown in TensorBoard and written as colourised PNGs.
    num_vis_images: int = 4

    def validate(self) -> None:
        _check(
            self.do_train or self.do_eval,
            "do_train",
            self.do_train,
            "True, or --do_eval=True (otherwise there is nothing to do)",
        )
        _check(self.dev_size == -1 or self.dev_size > 0, "dev_size", self.dev_size, "-1 or > 0")
        _check(self.num_vis_images >= 0, "num_vis_images", self.num_vis_images, ">= 0")
        _check(
            self.use_tpu == (self.strategy == "tpu"),
            "use_tpu",
            self.use_tpu,
            f"the same choice as --strategy={self.strategy}",
        )
        _check(self.train_steps > 0, "train_steps", self.train_steps, "> 0")
        _check(self.iterations > 0, "iterations", self.iterations, "> 0")
        _check(self.save_steps > 0, "save_steps", self.save_steps, "> 0")
        _check(self.max_save > 0, "max_save", self.max_save, "> 0")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _check(self.weight_decay_rate >= 0, "weight_decay_rate", self.weight_decay_rate, ">= 0")
        _check(
            0 <= self.warmup_steps <= self.train_steps,
            "warmup_steps",
            self.warmup_steps,
            f"in [0, --train_steps={self.train_steps}]",
        )
        _check(
            self.moving_average_decay < 1,
            "moving_average_decay",
            self.moving_average_decay,
            "< 1 (<= 0 disables the EMA)",
        )
        _check(self.strategy in STRATEGIES, "strategy", self.strategy, str(STRATEGIES))
        _check(
            not (self.jit_compile and self.strategy in ("mirrored", "multi_worker")),
            "jit_compile",
            self.jit_compile,
            f"False with --strategy={self.strategy} (XLA: --strategy=default or tpu)",
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    uda: UdaConfig = dataclasses.field(default_factory=UdaConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        """Checks every part and their agreement; returns self.

        Raises:
          ValueError: naming the flag and the value that is wrong.
        """
        for part in (self.data, self.model, self.uda, self.train):
            part.validate()
        _check(
            self.model.num_classes == self.data.num_classes == self.uda.num_classes,
            "num_classes",
            (self.data.num_classes, self.model.num_classes, self.uda.num_classes),
            "the same value for data, model and loss",
        )
        _check(
            self.data.unsup_ratio == self.uda.unsup_ratio,
            "unsup_ratio",
            (self.data.unsup_ratio, self.uda.unsup_ratio),
            "the same value for data and loss",
        )
        _check(
            self.data.unsup_mix == self.uda.unsup_mix,
            "unsup_mix",
            (self.data.unsup_mix, self.uda.unsup_mix),
            "the same value for data and loss",
        )
        if self.uda.uda_fp_coeff > 0 and self.model.model_name != "deeplabv3plus":
            raise ValueError(
                f"--uda_fp_coeff={self.uda.uda_fp_coeff} perturbs DeepLab's backbone features: "
                f"it needs --model_name=deeplabv3plus, not {self.model.model_name!r}."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of to_dict; unknown keys are an error naming them."""
        parts = {}
        for field in dataclasses.fields(cls):
            sub_cls = field.type if isinstance(field.type, type) else globals()[field.type]
            sub = dict(d.get(field.name, {}))
            known = {f.name for f in dataclasses.fields(sub_cls)}
            unknown = sorted(set(sub) - known)
            if unknown:
                raise ValueError(f"Unknown {field.name} config keys {unknown} in FLAGS.json.")
            parts[field.name] = sub_cls(**sub)
        return cls(**parts)
