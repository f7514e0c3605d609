"""Command-line flags of uda_tf, mirroring the original UDA's image/main.py.

The original's flags keep their name, type and default (google-research/uda
image/main.py at 960684e; `wrn_size` is not carried). The segmentation flags
are new and named in the same style. Each field of `uda_tf.config.Config` has
one flag of the same name; a flag shared by several parts (`num_classes`,
`unsup_ratio`, `train_steps`, `seed`, ...) fills all of them.

Usage (only `__main__` defines the flags, as Model Garden does):

    uda_flags.define_flags()
    ...
    cfg = uda_flags.config_from_flags(flags.FLAGS)
"""

import dataclasses

from absl import flags, logging

from uda_tf import config as config_lib
from uda_tf.data import sources

# Defaults that depend on --task_name; they apply to the flags that are not
# given on the command line. The flag defaults themselves are Cityscapes'.
TASK_DEFAULTS = {
    "cityscapes": {"num_classes": 19, "crop_height": 512, "crop_width": 1024},
    "camvid": {"num_classes": 11, "crop_height": 176, "crop_width": 240},
    "custom": {},
}

_PARTS = (
    ("data", config_lib.DataConfig),
    ("model", config_lib.ModelConfig),
    ("uda", config_lib.UdaConfig),
    ("train", config_lib.TrainConfig),
)


def _define_original(fv: flags.FlagValues) -> None:
    """The 32 flags of the original image/main.py that carry over."""
    # TPU.
    flags.DEFINE_string("master", None, "Address of the TPU master.", flag_values=fv)
    flags.DEFINE_string("tpu", None, "Name or grpc address of the Cloud TPU.", flag_values=fv)
    flags.DEFINE_string(
        "gcp_project", None, "GCP project of the TPU (auto-detected if unset).", flag_values=fv
    )
    flags.DEFINE_string(
        "tpu_zone", None, "GCP zone of the TPU (auto-detected if unset).", flag_values=fv
    )
    flags.DEFINE_bool("use_tpu", False, "Train on a TPU (same as --strategy=tpu).", flag_values=fv)
    # Data and UDA.
    flags.DEFINE_enum(
        "task_name",
        "cityscapes",
        list(config_lib.TASK_NAMES),
        "Dataset; also sets the defaults of --num_classes and the crop size.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "sup_size", -1, "Number of labeled training images; -1 = all.", flag_values=fv
    )
    flags.DEFINE_integer(
        "aug_copy",
        0,
        "The original's number of offline augmented copies. Augmentation runs online "
        "here (a fresh draw every time an image is read), so values > 0 are accepted "
        "and ignored.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "unsup_ratio",
        0,
        "Unlabeled batch = unsup_ratio * train_batch_size; 0 disables UDA.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "tsa",
        "",
        list(config_lib.TSA_SCHEDULES),
        "Training signal annealing schedule; empty = off.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "uda_confidence_thresh",
        -1,
        "Mask out unlabeled pixels whose max probability on the original is not above "
        "this; -1 = off.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "uda_softmax_temp", -1, "Temperature that sharpens the target; -1 = off.", flag_values=fv
    )
    flags.DEFINE_float(
        "ent_min_coeff", 0, "Weight of entropy minimisation on the originals.", flag_values=fv
    )
    flags.DEFINE_float(
        "unsup_coeff",
        1,
        "Weight of the consistency loss (an integer in the original; any float here).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "uda_target",
        "shared",
        list(config_lib.UDA_TARGETS),
        "Where the target on the originals comes from. shared: one training-mode pass on "
        "[labeled, ori, aug], BN statistics shared (the original). inference: the network "
        "alone on the originals in inference mode. ema: the EMA network so (a mean teacher). "
        "teacher: a trained run's EMA network (--uda_teacher_dir), fixed (self-training).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "uda_teacher_dir",
        "",
        "With --uda_target=teacher: the model_dir of a finished run (same classes) whose "
        "newest intact checkpoint's EMA network gives the targets, in inference mode and "
        "never updated (self-training, as Noisy Student and ST++).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "uda_target_flip",
        False,
        "With --uda_target=inference, ema or teacher: the target is the mean of the teacher's "
        "probabilities on the originals and on their mirror images, flipped back "
        "(a test-time-augmented pseudo-label, as Naive-Student's).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "uda_loss",
        "kl",
        list(config_lib.UDA_LOSSES),
        "Consistency divergence. kl: KL(target || aug), the original. ce: cross-entropy to "
        "the argmax of the unsharpened target (FixMatch / UniMatch hard targets), the same "
        "--uda_confidence_thresh mask and denominator; needs --uda_softmax_temp=-1. With "
        "--uda_target=ema it is FixMatch with a mean teacher.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "uda_fp_coeff",
        0.0,
        "UniMatch's feature perturbation (DeepLab only): adds this weight times the "
        "consistency loss between the target and a training pass on the originals whose "
        "backbone features lose whole channels (--uda_fp_dropout). 0 = off.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "uda_fp_dropout",
        0.5,
        "Channel dropout rate of --uda_fp_coeff's features (UniMatch: Dropout2d(0.5)).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "moving_average_decay",
        0.9999,
        "EMA decay of weights and BN statistics; evaluation and export use the EMA. "
        "<= 0 disables it.",
        flag_values=fv,
    )
    # Paths and modes.
    flags.DEFINE_string("data_dir", None, "Root of the dataset.", flag_values=fv)
    flags.DEFINE_string(
        "model_dir", None, "Checkpoints, FLAGS.json, results.txt, logs.", flag_values=fv
    )
    flags.DEFINE_bool("do_train", True, "Train.", flag_values=fv)
    flags.DEFINE_bool("do_eval", False, "Evaluate on the val split at the end.", flag_values=fv)
    flags.DEFINE_integer(
        "dev_size",
        -1,
        "If not -1: hold dev_size labeled train images out of the labeled subset and "
        "evaluate on them along training, when it begins and every --save_steps "
        "(forces --do_train and --do_eval).",
        flag_values=fv,
    )
    flags.DEFINE_bool("verbose", False, "Log the variable list.", flag_values=fv)
    # Training.
    flags.DEFINE_integer(
        "train_batch_size", 32, "Global labeled batch size (all replicas).", flag_values=fv
    )
    flags.DEFINE_integer("eval_batch_size", 8, "Evaluation batch size.", flag_values=fv)
    flags.DEFINE_integer(
        "train_steps",
        100000,
        "Total training steps; also the denominator of TSA and the LR schedule.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "iterations",
        10000,
        "Steps per execution (the TPU iterations per loop): steps run in one call, and the "
        "logging period.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "save_steps", 10000, "Checkpoint (and dev evaluation) period in steps.", flag_values=fv
    )
    flags.DEFINE_integer("max_save", 10, "Number of checkpoints to keep.", flag_values=fv)
    flags.DEFINE_enum(
        "model_name",
        "deeplabv3plus",
        list(config_lib.MODEL_NAMES),
        "Segmentation network.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_classes",
        19,
        "Number of classes (default by --task_name: cityscapes 19, camvid 11, custom: "
        "those of dataset.json).",
        flag_values=fv,
    )
    flags.DEFINE_float("learning_rate", 0.03, "Peak learning rate.", flag_values=fv)
    flags.DEFINE_float(
        "weight_decay_rate",
        5e-4,
        "Weight decay: 0.5 * rate * sum of squares of every trainable variable.",
        flag_values=fv,
    )
    flags.DEFINE_integer("warmup_steps", 0, "Linear learning-rate warmup steps.", flag_values=fv)


def _define_data(fv: flags.FlagValues) -> None:
    """New flags of the data pipeline (uda_tf.config.DataConfig)."""
    flags.DEFINE_enum(
        "data_source",
        "auto",
        list(sources.DATA_SOURCES),
        "How --data_dir is read (auto: from what it holds; see uda_tf/data/sources.py).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "use_equal_split",
        False,
        "Balance the labeled subset over cities (CamVid: sequences), as the original's "
        "preprocess.py flag.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "use_train_extra",
        False,
        "Add leftImg8bit/train_extra to the unlabeled pool (Cityscapes).",
        flag_values=fv,
    )
    flags.DEFINE_string("unlabeled_dir", None, "Extra folder of unlabeled images.", flag_values=fv)
    flags.DEFINE_string("eval_split", "val", "Split used by evaluation.", flag_values=fv)
    flags.DEFINE_float(
        "resize_factor",
        1.0,
        "Resize every image and mask by this factor when read (a cheaper, lower-resolution "
        "task); evaluation resizes the network's input only (see --eval_at_stored_size). "
        "1 = full resolution.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "eval_at_stored_size",
        True,
        "With --resize_factor != 1, score predictions at the labels' stored size (logits "
        "resized bilinearly, then argmax); false scores against resized masks (the smaller "
        "task's score).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "crop_height", 512, "Training crop height (camvid default 176).", flag_values=fv
    )
    flags.DEFINE_integer(
        "crop_width", 1024, "Training crop width (camvid default 240).", flag_values=fv
    )
    flags.DEFINE_float("min_scale", 0.5, "Smallest random scale before cropping.", flag_values=fv)
    flags.DEFINE_float("max_scale", 2.0, "Largest random scale before cropping.", flag_values=fv)
    flags.DEFINE_integer(
        "ignore_label", 255, "Mask value excluded from losses and metrics.", flag_values=fv
    )
    flags.DEFINE_integer(
        "seed", 0, "Seed of the labeled subset, augmentation and initialisation.", flag_values=fv
    )
    flags.DEFINE_integer(
        "shuffle_buffer", 1000, "Shuffle buffer of the training streams.", flag_values=fv
    )
    flags.DEFINE_string(
        "data_service_address",
        None,
        "grpc://host:port of a tf.data service dispatcher (python -m uda_tf.data.service): "
        "its workers read, decode, crop, augment and batch the training streams, the trainer "
        "only consumes batches. None = local input.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "aug_policy",
        "randaugment",
        list(config_lib.AUG_POLICIES),
        "Strong (aug) view of the unlabeled images: randaugment (UDA's, with --aug_ops, "
        "--aug_num_layers, ...) or color (UniMatch's colour jitter, greyscale and blur).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "unsup_mix",
        "none",
        list(config_lib.UNSUP_MIXES),
        "cutmix: CutMix between the unlabeled aug views of a batch (p 0.5, box 2-40 % of "
        "the crop, UniMatch); the targets are mixed with the same boxes. none: off.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "aug_ops",
        "all",
        list(config_lib.AUG_OPS),
        "RandAugment ops of the aug view: all 15 UDA ops, or the photometric ones only.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "aug_num_layers", 2, "RandAugment ops drawn per image (UDA: 2).", flag_values=fv
    )
    flags.DEFINE_float(
        "aug_prob", 0.5, "Probability that each drawn op fires (UDA: 0.5).", flag_values=fv
    )
    flags.DEFINE_bool(
        "aug_cutout", True, "Always-on Cutout after RandAugment (UDA: on).", flag_values=fv
    )
    flags.DEFINE_float(
        "aug_color_hue",
        config_lib.COLOR_HUE,
        "--aug_policy=color: the hue shift is uniform in [-h, h], a fraction of the colour "
        "circle (UniMatch: 0.25; 0 = no hue jitter).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "aug_color_max_sigma",
        config_lib.COLOR_MAX_SIGMA,
        f"--aug_policy=color: the blur's sigma is uniform in [{config_lib.COLOR_MIN_SIGMA}, this] "
        "pixels (UniMatch: 2.0, on crops of 321 to 801 pixels).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "sup_randaugment",
        False,
        "Also RandAugment the labeled crops, jointly with their masks.",
        flag_values=fv,
    )


def _define_model_and_run(fv: flags.FlagValues) -> None:
    """New flags of the network and of the run's machinery."""
    flags.DEFINE_enum(
        "backbone",
        "resnet50",
        list(config_lib.BACKBONES),
        "DeepLabv3+ backbone (mobilenetv2_torchvision: torchvision's padding, for its "
        "ImageNet weights).",
        flag_values=fv,
    )
    flags.DEFINE_integer("output_stride", 16, "DeepLabv3+ output stride: 8 or 16.", flag_values=fv)
    flags.DEFINE_string(
        "backbone_weights",
        None,
        "Local file of ImageNet backbone weights (nothing is downloaded); None = random init.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "backbone_width",
        1.0,
        "DeepLabv3+ backbone channel multiplier (the MobileNets' alpha); 1.0 = the ImageNet "
        "network. A keras.applications --backbone_weights file fixes it.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "decoder_filters",
        256,
        "DeepLabv3+ ASPP and decoder channels (DeepLab: 256).",
        flag_values=fv,
    )
    flags.DEFINE_integer("unet_depth", 4, "U-Net: number of down-sampling stages.", flag_values=fv)
    flags.DEFINE_integer("unet_filters", 64, "U-Net: filters of the first stage.", flag_values=fv)
    flags.DEFINE_bool(
        "synchronized_bn",
        True,
        "Batch-norm statistics over the global batch when there is more than one replica "
        "(FLAGS.json records the value used).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "strategy",
        "default",
        list(config_lib.STRATEGIES),
        "Distribution: default (one device), mirrored (local GPUs), multi_worker (TF_CONFIG), tpu.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "mixed_precision",
        False,
        "mixed_float16 compute on GPUs, mixed_bfloat16 on TPUs and CPU-only machines; "
        "variables stay float32.",
        flag_values=fv,
    )
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.", flag_values=fv)
    flags.DEFINE_bool(
        "deterministic",
        False,
        "tf.config.experimental.enable_op_determinism(): bit-exact reruns, slower.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_vis_images",
        4,
        "Validation images shown in TensorBoard and written as colourised predictions.",
        flag_values=fv,
    )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Registers every uda_tf flag on `flag_values`.

    Args:
      flag_values: where to register; tests pass a fresh `flags.FlagValues()`.
    """
    _define_original(flag_values)
    _define_data(flag_values)
    _define_model_and_run(flag_values)


def flag_names() -> list[str]:
    """The names of the flags that `define_flags` registers."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    return sorted(flag_values)


def _value(flag_values: flags.FlagValues, name: str):
    """The flag's value, or the --task_name default when it is not given.

    For --task_name=custom, --num_classes defaults to the number of classes
    that --data_dir/dataset.json declares.
    """
    flag = flag_values[name]
    task_name = flag_values["task_name"].value
    if flag.present:
        return flag.value
    if name in TASK_DEFAULTS.get(task_name, {}):
        return TASK_DEFAULTS[task_name][name]
    if name == "num_classes" and task_name == "custom":
        data_cfg = config_lib.DataConfig(task_name="custom", data_dir=flag_values["data_dir"].value)
        return sources.dataset_info(data_cfg).num_classes
    return flag.value


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.Config:
    """Builds and validates the frozen run config from parsed flags.

    Args:
      flag_values: parsed flags (see `define_flags`).

    Returns:
      A validated `uda_tf.config.Config`.

    Raises:
      ValueError: naming the flag and its value, for an invalid value or an
        invalid combination; raised before any data is read.
    """
    aug_copy = flag_values["aug_copy"].value
    if aug_copy < 0:
        raise ValueError(f"--aug_copy={aug_copy} is invalid: expected >= 0.")
    if aug_copy > 0:
        logging.info(
            "--aug_copy=%d is ignored: augmentation runs online, one fresh draw per read.",
            aug_copy,
        )
    parts = {}
    for part_name, cls in _PARTS:
        # A field without a flag keeps its default (tests/flags_test.py checks there is none).
        names = [f.name for f in dataclasses.fields(cls) if f.name in flag_values]
        parts[part_name] = cls(**{name: _value(flag_values, name) for name in names})
    train = parts["train"]
    if train.use_tpu or train.strategy == "tpu":
        if train.strategy not in ("default", "tpu"):
            raise ValueError(
                f"--use_tpu=True contradicts --strategy={train.strategy}: use --strategy=tpu."
            )
        train = dataclasses.replace(train, use_tpu=True, strategy="tpu")
    if train.dev_size != -1 and not (train.do_train and train.do_eval):
        logging.info(
            "--dev_size=%d: evaluating along training (do_train and do_eval).", train.dev_size
        )
        train = dataclasses.replace(train, do_train=True, do_eval=True)
    parts["train"] = train
    return config_lib.Config(**parts).validate()
