"""Tests of flags/uda_flags.py: the original's flags, config building, rejection."""

import dataclasses
import json
import os
import tempfile

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from augment import color
from flags import uda_flags
from uda_tf import config as config_lib

# The flags of google-research/uda image/main.py (960684e) that carry over:
# (name, absl type, default). sup_size, task_name, model_name and num_classes
# keep name and type with a segmentation default; unsup_coeff (an integer
# there) is a float here.
ORIGINAL_FLAGS = (
    ("master", "string", None),
    ("tpu", "string", None),
    ("gcp_project", "string", None),
    ("tpu_zone", "string", None),
    ("use_tpu", "bool", False),
    ("task_name", "string enum", "cityscapes"),
    ("sup_size", "int", -1),
    ("aug_copy", "int", 0),
    ("unsup_ratio", "int", 0),
    ("tsa", "string enum", ""),
    ("uda_confidence_thresh", "float", -1.0),
    ("uda_softmax_temp", "float", -1.0),
    ("ent_min_coeff", "float", 0.0),
    ("unsup_coeff", "float", 1.0),
    ("moving_average_decay", "float", 0.9999),
    ("data_dir", "string", None),
    ("model_dir", "string", None),
    ("do_train", "bool", True),
    ("do_eval", "bool", False),
    ("dev_size", "int", -1),
    ("verbose", "bool", False),
    ("train_batch_size", "int", 32),
    ("eval_batch_size", "int", 8),
    ("train_steps", "int", 100000),
    ("iterations", "int", 10000),
    ("save_steps", "int", 10000),
    ("max_save", "int", 10),
    ("model_name", "string enum", "deeplabv3plus"),
    ("num_classes", "int", 19),
    ("learning_rate", "float", 0.03),
    ("weight_decay_rate", "float", 5e-4),
    ("warmup_steps", "int", 0),
)

# Flags whose default differs from the dataclass field's on purpose.
DIFFERENT_DEFAULTS = {
    # Resolved at run time: used only with more than one replica.
    "synchronized_bn",
}

_PARTS = (
    config_lib.DataConfig,
    config_lib.ModelConfig,
    config_lib.UdaConfig,
    config_lib.TrainConfig,
)


def _parse(*argv: str) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    uda_flags.define_flags(flag_values)
    flag_values(["uda_tf.main", *argv])
    return flag_values


def _config(*argv: str) -> config_lib.Config:
    return uda_flags.config_from_flags(_parse(*argv))


class OriginalFlagsTest(tf.test.TestCase, parameterized.TestCase):
    def test_the_table_holds_the_32_carried_flags(self):
        self.assertLen({name for name, _, _ in ORIGINAL_FLAGS}, 32)

    @parameterized.parameters(*ORIGINAL_FLAGS)
    def test_name_type_default(self, name, flag_type, default):
        flag = _parse()[name]
        self.assertEqual(flag.flag_type(), flag_type)
        self.assertEqual(flag.default, default)
        if isinstance(default, float):
            self.assertIsInstance(flag.value, float)

    def test_enums(self):
        fv = _parse()
        self.assertEqual(
            fv["tsa"].parser.enum_values, ["", "linear_schedule", "log_schedule", "exp_schedule"]
        )
        self.assertEqual(fv["model_name"].parser.enum_values, ["deeplabv3plus", "unet"])
        self.assertContainsSubset({"cityscapes", "camvid"}, fv["task_name"].parser.enum_values)

    def test_integer_unsup_coeff_as_in_the_original_scripts(self):
        self.assertEqual(_config("--unsup_coeff=6").uda.unsup_coeff, 6.0)
        self.assertEqual(_config("--unsup_coeff=0.5").uda.unsup_coeff, 0.5)

    def test_wrn_size_is_not_carried(self):
        self.assertNotIn("wrn_size", _parse())


class ConfigFromFlagsTest(tf.test.TestCase, parameterized.TestCase):
    def test_every_config_field_has_a_flag_with_its_default(self):
        fv = _parse()
        for cls in _PARTS:
            for field in dataclasses.fields(cls):
                self.assertIn(field.name, fv, f"{cls.__name__}.{field.name} has no flag")
                if field.name not in DIFFERENT_DEFAULTS:
                    self.assertEqual(fv[field.name].default, field.default, field.name)

    def test_defaults_give_the_default_config(self):
        cfg = _config()
        expected = config_lib.Config(
            model=config_lib.ModelConfig(synchronized_bn=True),
        )
        self.assertEqual(cfg, expected)

    def test_a_shared_flag_fills_every_part(self):
        cfg = _config(
            "--unsup_ratio=7",
            "--train_steps=500",
            "--num_classes=19",
            "--seed=3",
            "--dev_size=5",
            "--ignore_label=250",
        )
        self.assertEqual((cfg.data.unsup_ratio, cfg.uda.unsup_ratio), (7, 7))
        self.assertEqual((cfg.uda.train_steps, cfg.train.train_steps), (500, 500))
        self.assertEqual((cfg.data.seed, cfg.train.seed), (3, 3))
        self.assertEqual((cfg.data.dev_size, cfg.train.dev_size), (5, 5))
        self.assertEqual((cfg.data.ignore_label, cfg.uda.ignore_label), (250, 250))

    def test_the_gpu_script_flags(self):
        cfg = _config(
            "--use_tpu=False",
            "--do_train=True",
            "--do_eval=True",
            "--sup_size=372",
            "--unsup_ratio=7",
            "--train_batch_size=8",
            "--train_steps=50000",
            "--uda_confidence_thresh=0.8",
            "--uda_softmax_temp=0.4",
            "--tsa=linear_schedule",
        )
        self.assertEqual(cfg.data.sup_size, 372)
        self.assertEqual(cfg.data.train_batch_size, 8)
        self.assertEqual(cfg.uda.uda_confidence_thresh, 0.8)
        self.assertEqual(cfg.uda.uda_softmax_temp, 0.4)
        self.assertEqual(cfg.uda.tsa, "linear_schedule")
        self.assertTrue(cfg.train.do_eval)

    def test_task_defaults_apply_only_to_flags_not_given(self):
        cfg = _config("--task_name=camvid")
        self.assertEqual(cfg.data.num_classes, 11)
        self.assertEqual(cfg.model.num_classes, 11)
        self.assertEqual((cfg.data.crop_height, cfg.data.crop_width), (176, 240))
        cfg = _config("--task_name=camvid", "--crop_height=128")
        self.assertEqual((cfg.data.crop_height, cfg.data.crop_width), (128, 240))

    def test_custom_num_classes_comes_from_dataset_json(self):
        with tempfile.TemporaryDirectory() as data_dir:
            with open(os.path.join(data_dir, "dataset.json"), "w") as f:
                json.dump({"class_names": ["background", "crack", "rust"]}, f)
            cfg = _config("--task_name=custom", f"--data_dir={data_dir}")
        self.assertEqual(cfg.uda.num_classes, 3)

    def test_use_tpu_and_strategy_tpu_are_one_choice(self):
        for argv in (("--use_tpu",), ("--strategy=tpu",)):
            cfg = _config(*argv, "--tpu=node-1")
            self.assertEqual((cfg.train.use_tpu, cfg.train.strategy), (True, "tpu"))
            self.assertEqual(cfg.train.tpu, "node-1")

    def test_dev_size_evaluates_along_training(self):
        cfg = _config("--dev_size=50", "--do_eval=False")
        self.assertTrue(cfg.train.do_train)
        self.assertTrue(cfg.train.do_eval)

    def test_aug_copy_is_accepted_and_ignored(self):
        self.assertEqual(_config("--aug_copy=100"), _config())

    @parameterized.parameters(
        (("--uda_confidence_thresh=1.5",), "uda_confidence_thresh"),
        (("--uda_softmax_temp=0",), "uda_softmax_temp"),
        (("--unsup_ratio=-1",), "unsup_ratio"),
        (("--train_batch_size=0",), "train_batch_size"),
        (("--aug_copy=-1",), "aug_copy"),
        (("--moving_average_decay=1",), "moving_average_decay"),
        (("--use_tpu", "--strategy=mirrored"), "use_tpu"),
        (("--jit_compile", "--strategy=multi_worker"), "jit_compile"),
        (("--do_train=false", "--do_eval=false"), "do_train"),
        (("--warmup_steps=200", "--train_steps=100"), "warmup_steps"),
        (("--min_scale=2", "--max_scale=1"), "max_scale"),
        (("--ignore_label=5",), "ignore_label"),
        (("--output_stride=4",), "output_stride"),
        (("--sup_size=0",), "sup_size"),
        (("--dev_size=0",), "dev_size"),
        (("--save_steps=0",), "save_steps"),
        (("--iterations=0",), "iterations"),
        (("--backbone_width=0",), "backbone_width"),
        (("--decoder_filters=0",), "decoder_filters"),
        (("--backbone_width=0.5", "--backbone_weights=resnet50_notop.h5"), "backbone_width"),
        (
            ("--backbone=mobilenetv2", "--backbone_width=0.3", "--backbone_weights=m.h5"),
            "backbone_width",
        ),
    )
    def test_invalid_values_are_rejected_naming_the_flag(self, argv, flag):
        with self.assertRaisesRegex(ValueError, f"--{flag}="):
            _config(*argv)

    def test_backbone_width_and_decoder_filters(self):
        cfg = _config("--backbone=mobilenetv1", "--backbone_width=0.75", "--decoder_filters=64")
        self.assertEqual((cfg.model.backbone_width, cfg.model.decoder_filters), (0.75, 64))
        # keras.applications files exist at the MobileNets' alphas; a .weights.h5
        # file saved from our own backbone may have any width.
        for width, *argv in (
            (0.35, "--backbone=mobilenetv2", "--backbone_weights=m.h5"),
            (0.25, "--backbone_weights=ours.weights.h5"),
            (0.5, "--model_name=unet", "--backbone_weights=resnet50.h5"),
        ):
            cfg = _config(f"--backbone_width={width}", *argv)
            self.assertEqual(cfg.model.backbone_width, width)
        with self.assertRaisesRegex(ValueError, r"^--backbone_width=0\.5 is invalid: .*\(1\.0,\)"):
            _config("--backbone=xception", "--backbone_width=0.5", "--backbone_weights=x.h5")

    def test_strong_view_flags(self):
        cfg = _config(
            "--unsup_ratio=2", "--uda_loss=ce", "--unsup_mix=cutmix", "--aug_policy=color"
        )
        self.assertEqual(cfg.uda.uda_loss, "ce")
        self.assertEqual((cfg.data.unsup_mix, cfg.uda.unsup_mix), ("cutmix", "cutmix"))
        self.assertEqual(cfg.data.aug_policy, "color")
        # FLAGS.json records them and reads them back.
        written = json.loads(json.dumps(cfg.to_dict()))
        self.assertEqual(written["uda"]["uda_loss"], "ce")
        self.assertEqual(written["data"]["unsup_mix"], "cutmix")
        self.assertEqual(written["data"]["aug_policy"], "color")
        self.assertEqual(config_lib.Config.from_dict(written), cfg)
        # A FLAGS.json written before these flags reads back with their defaults.
        for part, key in (("uda", "uda_loss"), ("uda", "unsup_mix"), ("data", "unsup_mix")):
            del written[part][key]
        del written["data"]["aug_policy"]
        old = config_lib.Config.from_dict(written).validate()
        self.assertEqual((old.uda.uda_loss, old.uda.unsup_mix), ("kl", "none"))
        self.assertEqual((old.data.unsup_mix, old.data.aug_policy), ("none", "randaugment"))

    @parameterized.parameters(
        (("--uda_loss=ce",), "uda_loss", "unsup_ratio"),
        (("--unsup_mix=cutmix",), "unsup_mix", "unsup_ratio"),
        (
            ("--unsup_ratio=1", "--uda_loss=ce", "--uda_softmax_temp=0.4"),
            "uda_loss",
            "uda_softmax_temp",
        ),
        (
            ("--unsup_ratio=1", "--train_batch_size=1", "--unsup_mix=cutmix"),
            "unsup_mix",
            "train_batch_size",
        ),
        (("--aug_policy=color", "--aug_ops=photometric"), "aug_ops", "aug_policy"),
        (("--aug_policy=color", "--aug_num_layers=3"), "aug_num_layers", "aug_policy"),
        (("--aug_color_hue=0.1",), "aug_color_hue", "aug_policy"),
        (("--aug_color_max_sigma=1",), "aug_color_max_sigma", "aug_policy"),
    )
    def test_invalid_combinations_name_both_flags(self, argv, flag, other):
        with self.assertRaisesRegex(ValueError, f"^[^\\n]*--{flag}=[^\\n]*--{other}=[^\\n]*$"):
            _config(*argv)

    def test_valid_combinations_of_the_strong_view_flags(self):
        for argv in (
            ("--uda_loss=ce", "--uda_target=ema", "--uda_confidence_thresh=0.95"),
            ("--uda_loss=ce", "--ent_min_coeff=0.1"),
            ("--unsup_mix=cutmix", "--uda_target=inference", "--aug_policy=color"),
        ):
            cfg = _config("--unsup_ratio=1", "--train_batch_size=2", *argv)
            self.assertEqual(cfg.uda.unsup_ratio, 1)

    def test_colour_hue_reaches_the_config_and_is_range_checked(self):
        self.assertEqual(_config().data.aug_color_hue, color.HUE)
        self.assertEqual(_config("--aug_policy=color", "--aug_color_hue=0").data.aug_color_hue, 0)
        with self.assertRaisesRegex(ValueError, r"--aug_color_hue=0\.6 .*in \[0, 0\.5\]"):
            _config("--aug_policy=color", "--aug_color_hue=0.6")

    def test_colour_max_sigma_reaches_the_config_and_is_range_checked(self):
        self.assertEqual(_config().data.aug_color_max_sigma, color.SIGMA_RANGE[1])
        self.assertEqual(config_lib.COLOR_MIN_SIGMA, color.SIGMA_RANGE[0])
        cfg = _config("--aug_policy=color", "--aug_color_max_sigma=0.5")
        self.assertEqual(cfg.data.aug_color_max_sigma, 0.5)
        with self.assertRaisesRegex(ValueError, r"--aug_color_max_sigma=0\.05 .*>= 0\.1"):
            _config("--aug_policy=color", "--aug_color_max_sigma=0.05")

    def test_docs_name_every_flag(self):
        docs = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "flags.md")
        with open(docs) as f:
            text = f.read()
        for name in uda_flags.flag_names():
            self.assertTrue(f"`--{name}" in text, f"--{name} is not in {docs}")

    @parameterized.parameters(
        "--tsa=linear",
        "--model_name=wrn",
        "--strategy=horovod",
        "--uda_loss=mse",
        "--unsup_mix=mixup",
        "--aug_policy=autoaugment",
    )
    def test_unknown_enum_values_fail_at_parsing(self, arg):
        with self.assertRaisesRegex(flags.IllegalFlagValueError, arg.split("=")[0]):
            _parse(arg)


if __name__ == "__main__":
    tf.test.main()
