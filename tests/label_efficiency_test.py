"""Tests of the label-efficiency experiment's planning, resuming and reports."""

import csv
import os
import tempfile

import tensorflow as tf
from absl.testing import parameterized

from uda_tf import evaluate
from uda_tf.experiments import label_efficiency as le


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
            output_dir="out", fraction_list=["1/8"], num_seeds=2, methods=le.METHODS, num_train=367
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


class ReportTest(tf.test.TestCase):
    def test_finished_runs_are_not_repeated_and_reports_are_written(self):
        out = tempfile.mkdtemp()
        runs = le.plan_runs(
            output_dir=out,
            fraction_list=["1/8", "1"],
            num_seeds=2,
            methods=le.METHODS,
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
