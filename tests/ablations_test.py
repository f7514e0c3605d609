"""Tests of the ablation experiment's planning and its table."""

import csv
import os
import tempfile

import tensorflow as tf

from uda_tf import evaluate
from uda_tf.experiments import ablations
from uda_tf.experiments import label_efficiency as le


def _row(variant: str, seed: int, mean_iou: float, wall_s: float = 60.0) -> dict:
    return {"variant": variant, "seed": seed, "mean_iou": mean_iou, "wall_s": wall_s}


class PlanTest(tf.test.TestCase):
    def test_runs_use_label_efficiency_names_under_the_variant(self):
        planned = ablations.plan(
            output_dir="out", names=["supervised", "ratio1"], fraction="1/8", num_seeds=2,
            num_train=367,
        )  # fmt: skip
        self.assertEqual(
            [(name, run.method, run.seed, run.sup_size, run.model_dir) for name, run in planned],
            [
                ("supervised", "supervised", 0, 46, "out/supervised/frac1of8_supervised_seed0"),
                ("supervised", "supervised", 1, 46, "out/supervised/frac1of8_supervised_seed1"),
                ("ratio1", "uda", 0, 46, "out/ratio1/frac1of8_uda_seed0"),
                ("ratio1", "uda", 1, 46, "out/ratio1/frac1of8_uda_seed1"),
            ],
        )

    def test_a_variant_changes_only_its_flags(self):
        (_, run), (_, ref) = ablations.plan(
            output_dir="o", names=["plain_kl", "uda"], fraction="1/8", num_seeds=1, num_train=367
        )
        args = le.run_flags(
            run, task_name="camvid", data_dir="d", preset="cpu",
            extra=list(ablations.VARIANTS["plain_kl"].flags),
        )  # fmt: skip
        ref_args = le.run_flags(ref, task_name="camvid", data_dir="d", preset="cpu", extra=[])
        # absl keeps the last value of a repeated flag: the variant's.
        parsed = dict(a[2:].split("=", 1) for a in args)
        parsed_ref = dict(a[2:].split("=", 1) for a in ref_args)
        changed = {k for k in parsed if parsed[k] != parsed_ref[k]}
        self.assertEqual(changed, {"model_dir", "uda_softmax_temp", "uda_confidence_thresh"})
        self.assertEqual(parsed["uda_softmax_temp"], "-1")

    def test_a_self_training_variant_learns_from_the_supervised_variant_of_its_seed(self):
        planned = ablations.plan(
            output_dir="o", names=["supervised", "selftrain_thresh_off"], fraction="1/8",
            num_seeds=2, num_train=367,
        )  # fmt: skip
        _, run = planned[3]
        self.assertEqual((run.method, run.seed), ("uda_selftrain", 1))
        teacher = ablations.teacher_dir("o", run)
        self.assertEqual(teacher, planned[1][1].model_dir)
        args = le.run_flags(
            run, task_name="camvid", data_dir="d", preset="cpu", teacher=teacher,
            extra=list(ablations.VARIANTS["selftrain_thresh_off"].flags),
        )  # fmt: skip
        self.assertIn("--uda_teacher_dir=o/supervised/frac1of8_supervised_seed1", args)
        self.assertEqual(args[-1], "--uda_confidence_thresh=-1")
        with self.assertRaisesRegex(ValueError, "uda_selftrain learns from the supervised variant"):
            ablations.plan(output_dir="o", names=["uda_selftrain", "supervised"], fraction="1/8",
                           num_seeds=1, num_train=367)  # fmt: skip

    def test_unknown_variant_is_named(self):
        with self.assertRaisesRegex(ValueError, "--variants.*'thresh9'"):
            ablations.plan(output_dir="o", names=["thresh9"], fraction="1/8", num_seeds=1,
                           num_train=367)  # fmt: skip

    def test_strong_variants_tune_uda_strong_one_unlabeled_flag_at_a_time(self):
        strong = {n: v for n, v in ablations.VARIANTS.items() if n.startswith("strong_")}
        self.assertGreaterEqual(len(strong), 4)
        for name, variant in strong.items():
            self.assertEqual((variant.method, variant.reference), ("uda_strong", "uda_strong"))
            keys = {f[2:].split("=")[0] for f in variant.flags}
            # Flags of the unlabeled loss and of the aug view only: supervised is untouched.
            unlabeled = set(le.STRONG_FLAGS) | {
                "uda_softmax_temp",
                "aug_color_hue",
                "aug_color_max_sigma",
                "uda_target_flip",
            }
            self.assertTrue(keys <= unlabeled, name)

    def test_a_tuning_row_is_named_by_its_variant(self):
        ((name, run),) = ablations.plan(
            output_dir=tempfile.mkdtemp(), names=["strong_kl"], fraction="1/8", num_seeds=1,
            num_train=367,
        )  # fmt: skip
        os.makedirs(run.model_dir)
        evaluate.write_results(
            os.path.join(run.model_dir, "results.txt"), {"mean_iou": 0.5, "iou/sky": 0.9},
            global_step=1200,
        )  # fmt: skip
        args = le.run_flags(
            run, task_name="camvid", data_dir="d", preset="cpu",
            extra=list(ablations.VARIANTS[name].flags),
        )  # fmt: skip
        row = ablations.tuning_row(name, le.execute(run, args), args, le.PRESETS["cpu"])
        self.assertEqual(
            (row["method"], row["tuning"], row["reference"], row["steps"]),
            ("strong_kl", True, "uda_strong", 1200),
        )
        self.assertIn("--uda_target=ema", row["flags"])  # uda_strong's, over the preset
        flags_set = set(row["flags"].split())
        self.assertContainsSubset({"--uda_loss=kl", "--uda_softmax_temp=0.4"}, flags_set)
        self.assertNotIn("--uda_loss=ce", flags_set)  # the variant's value wins

    def test_every_reference_is_a_variant(self):
        for name, variant in ablations.VARIANTS.items():
            self.assertIn(variant.method, le.METHODS, name)
            if variant.reference:
                self.assertIn(variant.reference, ablations.VARIANTS, name)


class TableTest(tf.test.TestCase):
    def test_differences_are_over_the_seeds_both_have(self):
        rows = [
            _row("supervised", 0, 0.40),
            _row("supervised", 1, 0.50),
            _row("uda", 0, 0.43),
            _row("uda", 1, 0.52),
            _row("ratio1", 1, 0.55, wall_s=120.0),  # seed 1 only: compared with 50, not 45.
        ]
        lines = {line.split(" | ")[0][2:]: line for line in ablations.table(rows).splitlines()}
        self.assertIn("| 2 | 40.0, 50.0 | 45.0 | — |", lines["supervised"])
        self.assertIn(
            "| 2 | 43.0, 52.0 | 47.5 | +2.5 vs supervised (seeds 0,1) | 1.0 |", lines["uda"]
        )
        self.assertIn("| 1 | 55.0 | 55.0 | +5.0 vs supervised (seeds 1) | 2.0 |", lines["ratio1"])

    def test_outputs_from_finished_runs(self):
        out = tempfile.mkdtemp()
        planned = ablations.plan(
            output_dir=out, names=["supervised", "uda"], fraction="1/8", num_seeds=1,
            num_train=367,
        )  # fmt: skip
        rows = []
        for i, (name, run) in enumerate(planned):
            os.makedirs(run.model_dir)
            evaluate.write_results(
                os.path.join(run.model_dir, "results.txt"), {"mean_iou": 0.4 + 0.05 * i},
                global_step=10,
            )  # fmt: skip
            # No subprocess can run here: a missing results.txt would try to train.
            rows.append({"variant": name, **le.execute(run, ["--definitely_not_a_flag"])})
        ablations.write_outputs(rows, out)
        with open(os.path.join(out, "ablations.csv")) as f:
            written = list(csv.DictReader(f))
        self.assertEqual([r["variant"] for r in written], ["supervised", "uda"])
        with open(os.path.join(out, "ablations.md")) as f:
            self.assertIn("+5.0 vs supervised (seeds 0)", f.read())


if __name__ == "__main__":
    tf.test.main()
