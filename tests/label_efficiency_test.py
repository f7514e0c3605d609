"""Tests of the label-efficiency experiment's planning, resuming and reports."""

import csv
import functools
import os
import tempfile

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from flags import uda_flags
from uda_tf import evaluate
from uda_tf.experiments import label_efficiency as le

# The flags a method may set: the unlabeled loss and its data, nothing else.
UNLABELED_FLAGS = {
    "unsup_ratio",
    "uda_confidence_thresh",
    "uda_softmax_temp",
    "unsup_coeff",
    "aug_policy",
    "aug_cutout",
    "unsup_mix",
    "uda_loss",
    "uda_target",
    "uda_teacher_dir",
}


def _fake_weights_dir() -> str:
    """A folder holding an (empty) file of the pretrained preset's name."""
    path = tempfile.mkdtemp()
    open(os.path.join(path, le.MOBILENET_V2_035), "w").close()
    return path


def _parsed(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args)


class PlanTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        ("1/16", 367, 23), ("1/8", 367, 46), ("1/4", 2975, 744), ("1", 367, -1)
    )
    def test_sup_size(self, fraction, num_train, want):
        self.assertEqual(le.sup_size_for(fraction, num_train), want)

    @parameterized.parameters("0", "3/2", "x", "1/0")
    def test_bad_fraction_is_named(self, text):
        with self.assertRaisesRegex(ValueError, "--fractions"):
            le.parse_fractions(text)

    def test_methods_differ_only_in_the_unlabeled_loss(self):
        runs = le.plan_runs(
            output_dir="out",
            fraction_list=["1/8"],
            num_seeds=2,
            methods=("supervised", "uda"),
            num_train=367,
        )
        self.assertLen(runs, 4)
        by_key = {(r.method, r.seed): r for r in runs}
        sup = le.run_flags(
            by_key["supervised", 1], task_name="camvid", data_dir="d", preset="cpu", extra=[]
        )
        uda = le.run_flags(
            by_key["uda", 1],
            task_name="camvid",
            data_dir="d",
            preset="cpu",
            extra=["--train_steps=7"],
        )
        strip = lambda args: {a for a in args if not a.startswith("--model_dir=")}
        differing = {a.split("=")[0] for a in strip(sup) ^ strip(uda)}
        self.assertEqual(
            differing,
            {
                "--unsup_ratio",
                "--uda_confidence_thresh",
                "--uda_softmax_temp",
                "--unsup_coeff",
                "--train_steps",
            },
        )
        self.assertIn("--seed=1", sup)
        self.assertIn("--sup_size=46", uda)
        self.assertEqual(uda[-1], "--train_steps=7")  # extra flags come last and win.

    def test_first_seed_plans_the_same_runs_as_the_whole_range(self):
        plan = functools.partial(
            le.plan_runs,
            output_dir="out",
            fraction_list=["1/8"],
            methods=("supervised", "uda"),
            num_train=367,
        )
        tail = plan(num_seeds=2, first_seed=3)
        self.assertEqual(
            [(r.seed, r.method) for r in tail],
            [(3, "supervised"), (3, "uda"), (4, "supervised"), (4, "uda")],
        )
        self.assertEqual(tail, plan(num_seeds=5)[6:])  # same folders and subsets as seeds 3, 4.
        args = le.run_flags(tail[0], task_name="camvid", data_dir="d", preset="cpu", extra=[])
        self.assertIn("--seed=3", args)
        self.assertIn("--model_dir=out/frac1of8_supervised_seed3", args)


class PretrainedPresetTest(tf.test.TestCase, parameterized.TestCase):
    def _method_flags(self, weights_dir: str) -> dict[str, dict[str, str]]:
        runs = le.plan_runs(
            output_dir="out", fraction_list=["1/8"], num_seeds=1, methods=le.METHODS, num_train=367
        )
        return {
            run.method: _parsed(
                le.run_flags(
                    run,
                    task_name="camvid",
                    data_dir="d",
                    preset="cpu_pretrained",
                    extra=[],
                    weights_dir=weights_dir,
                )
            )
            for run in runs
        }

    def test_every_method_trains_the_same_model_steps_and_batches(self):
        weights_dir = _fake_weights_dir()
        by_method = self._method_flags(weights_dir)
        self.assertEqual(
            set(by_method), {"supervised", "uda", "uda_strong", "uda_selftrain", "uda_selftrain2"}
        )
        preset = le.PRESETS["cpu_pretrained"]
        self.assertEmpty(set(preset) & UNLABELED_FLAGS)
        for method, parsed in by_method.items():
            for key in set(preset) - {"backbone_weights"}:
                self.assertEqual(parsed[key], str(preset[key]), f"{method}: --{key}")
            self.assertEqual(
                parsed["backbone_weights"], os.path.join(weights_dir, le.MOBILENET_V2_035)
            )
            self.assertTrue(
                set(parsed) - set(preset) - set(le.record_lib.RUN_KEYS) <= UNLABELED_FLAGS
            )
        self.assertEqual(by_method["supervised"]["unsup_ratio"], "0")
        strong = by_method["uda_strong"]
        self.assertEqual(
            {k: strong[k] for k in ("aug_policy", "unsup_mix", "uda_loss", "uda_target")},
            {"aug_policy": "color", "unsup_mix": "cutmix", "uda_loss": "ce", "uda_target": "ema"},
        )
        self.assertEqual(strong["uda_confidence_thresh"], "0.95")
        self.assertEqual(strong["aug_cutout"], "False")  # UniMatch's view: no Cutout.
        self.assertNotIn("aug_cutout", by_method["uda"])  # UDA keeps its always-on one.
        self.assertEqual(by_method["uda"]["uda_softmax_temp"], "0.4")
        # Self-training's second round: the first round's flags, its student as the teacher.
        second = by_method["uda_selftrain2"]
        self.assertEqual(second.pop("uda_teacher_dir"), "out/frac1of8_uda_selftrain_seed0")
        self.assertEqual(second.pop("model_dir"), "out/frac1of8_uda_selftrain2_seed0")
        # Self-training: the field's recipe, its targets from the supervised run of the seed.
        selftrain = by_method["uda_selftrain"]
        self.assertEqual(selftrain.pop("uda_teacher_dir"), "out/frac1of8_supervised_seed0")
        self.assertEqual(selftrain.pop("model_dir"), "out/frac1of8_uda_selftrain_seed0")
        self.assertEqual(second, selftrain)
        self.assertEqual(selftrain.pop("uda_target"), "teacher")
        strong.pop("uda_target"), strong.pop("model_dir")
        self.assertEqual(selftrain, strong)

    def test_a_teacher_method_needs_supervised_before_it(self):
        le.check_methods(["supervised", "uda_strong", "uda_selftrain"])
        for methods in (["uda_selftrain"], ["uda_selftrain", "supervised"]):
            with self.assertRaisesRegex(ValueError, "uda_selftrain learns from the supervised run"):
                le.check_methods(methods)
        le.check_methods(["supervised", "uda_selftrain", "uda_selftrain2"])
        for methods in (["supervised", "uda_selftrain2"], ["uda_selftrain2", "uda_selftrain"]):
            with self.assertRaisesRegex(
                ValueError, "uda_selftrain2 learns from the uda_selftrain run of its seed"
            ):
                le.check_methods(["supervised", *methods])
        with self.assertRaisesRegex(ValueError, r"unknown \['mean_teacher'\]"):
            le.check_methods(["supervised", "mean_teacher"])

    def test_the_model_is_the_pretrained_deeplab(self):
        preset = le.PRESETS["cpu_pretrained"]
        self.assertEqual(
            (preset["model_name"], preset["backbone"], preset["backbone_width"]),
            ("deeplabv3plus", "mobilenetv2", 0.35),
        )
        self.assertIn(preset["decoder_filters"], (64, 96))
        self.assertEqual(preset["output_stride"], 16)
        # The crop fits the 90x120 frames of CamVid at --resize_factor=0.5.
        self.assertLessEqual(preset["crop_height"], 90)
        self.assertLessEqual(preset["crop_width"], 120)

    def test_missing_weights_name_their_path(self):
        empty = tempfile.mkdtemp()
        want = os.path.join(empty, le.MOBILENET_V2_035)
        with self.assertRaisesRegex(ValueError, f"{want}.*--weights_dir"):
            le.preset_values("cpu_pretrained", empty)
        self.assertNotIn("backbone_weights", le.preset_values("cpu", empty))

    def test_default_weights_dir_is_beside_the_repo(self):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.assertEqual(
            le.DEFAULT_WEIGHTS_DIR,
            os.path.join(os.path.dirname(repo), "shared", "data", "weights"),
        )

    @parameterized.parameters(*le.METHODS)
    def test_each_method_is_a_valid_uda_tf_main_config(self, method):
        flag_values = flags.FlagValues()
        uda_flags.define_flags(flag_values)
        args = self._method_flags(_fake_weights_dir())[method]
        missing = sorted(k for k in args if k not in flag_values)
        self.assertEmpty(missing)
        flag_values(["uda_tf.main", *(f"--{k}={v}" for k, v in args.items())])
        cfg = uda_flags.config_from_flags(flag_values)  # validates
        self.assertEqual(cfg.model.backbone_width, 0.35)
        self.assertEqual(cfg.uda.unsup_ratio, 0 if method == "supervised" else 2)


class ReportTest(tf.test.TestCase):
    def test_finished_runs_are_not_repeated_and_reports_are_written(self):
        out = tempfile.mkdtemp()
        runs = le.plan_runs(
            output_dir=out,
            fraction_list=["1/8", "1"],
            num_seeds=2,
            methods=("supervised", "uda"),
            num_train=367,
        )
        rows = []
        for i, run in enumerate(runs):
            os.makedirs(run.model_dir)
            evaluate.write_results(
                os.path.join(run.model_dir, "results.txt"),
                {"mean_iou": 0.40 + 0.01 * i},
                global_step=10,
            )
            # No subprocess can run here: a missing results.txt would try to train.
            rows.append(le.execute(run, ["--definitely_not_a_flag"]))
        le.write_outputs(rows, out, "test")
        with open(os.path.join(out, "runs.csv")) as f:
            table = list(csv.DictReader(f))
        self.assertLen(table, 8)
        self.assertAlmostEqual(float(table[3]["mean_iou"]), 0.43)
        summary = {(s["fraction"], s["method"]): s for s in le.summarize(rows)}
        # Seeds 0 and 1 of (1/8, uda) are rows 1 and 3: 41 and 43 points.
        self.assertAlmostEqual(summary["1/8", "uda"]["mean"], 42.0)
        self.assertAlmostEqual(summary["1/8", "uda"]["std"], 2**0.5)
        with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
            text = f.read()
        self.assertIn("| 1/8 | uda | 2 | 42.0 ± 1.4 | 41.0, 43.0 |", text)
        self.assertGreater(os.path.getsize(os.path.join(out, "label_efficiency.png")), 1000)


if __name__ == "__main__":
    tf.test.main()
