"""Tests of the experiment record (uda_tf/experiments/record.py): CSV round trip, tables."""

import math
import os
import tempfile

import tensorflow as tf

from uda_tf import evaluate
from uda_tf.experiments import record

# A fake record: 2 seeds of supervised, uda and uda_strong at 1/8, one tuning run.
FAKE_CSV = """\
fraction,method,seed,mean_iou,pixel_accuracy,wall_s,steps,flags,tuning,reference,model_dir,iou/sky,iou/car
1/8,supervised,0,0.40,0.80,600,1200,--unsup_ratio=0,no,,r/s0,0.90,0.30
1/8,supervised,1,0.42,0.82,600,1200,--unsup_ratio=0,no,,r/s1,0.92,0.32
1/8,uda,0,0.41,0.81,1800,1200,--unsup_ratio=2,no,,r/u0,0.91,0.20
1/8,uda,1,0.41,0.81,1800,1200,--unsup_ratio=2,no,,r/u1,0.93,0.22
1/8,uda_strong,0,0.44,0.84,1500,1200,--unsup_ratio=2 --uda_loss=ce,no,,r/t0,0.95,0.35
1/8,uda_strong,1,0.46,0.85,1500,1200,--unsup_ratio=2 --uda_loss=ce,no,,r/t1,0.97,0.41
1/8,strong_kl,0,0.60,0.90,1500,1200,--unsup_ratio=2 --uda_loss=kl,yes,uda_strong,r/k0,0.99,0.50
"""


def _fake_record() -> str:
    path = os.path.join(tempfile.mkdtemp(), "fake.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write(FAKE_CSV)
    return path


def _row(method: str, seed: int, mean_iou: float, tuning: bool = False, **extra) -> dict:
    row = {
        "fraction": "1/8",
        "method": method,
        "seed": seed,
        "mean_iou": mean_iou,
        "pixel_accuracy": 0.8,
        "wall_s": 60.0,
        "steps": 1200,
        "flags": "--unsup_ratio=2 --uda_loss=ce",
        "tuning": tuning,
        "reference": "uda_strong" if tuning else "",
        "model_dir": f"runs/{method}{seed}",
    }
    row.update(extra)
    return row


class CsvTest(tf.test.TestCase):
    def test_write_read_round_trip(self):
        rows = [
            _row("uda", 0, 0.41, **{"iou/sky": 0.9, "iou/car": float("nan")}),
            _row("strong_kl", 0, 0.43, tuning=True, **{"iou/sky": 0.8, "iou/car": 0.25}),
        ]
        path = os.path.join(tempfile.mkdtemp(), "sub", "record.csv")
        record.write_record(path, rows)
        self.assertFalse(os.path.exists(path + ".partial"))
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
        self.assertEqual(header, list(record.FIELDS) + ["iou/sky", "iou/car"])
        back = record.read_record(path)
        self.assertLen(back, 2)
        for want, got in zip(rows, back):
            for key, value in want.items():
                if isinstance(value, float) and math.isnan(value):
                    self.assertTrue(math.isnan(got[key]), key)
                else:
                    self.assertEqual(got[key], value, key)
        self.assertIs(back[1]["tuning"], True)
        self.assertIsInstance(back[0]["seed"], int)

    def test_a_file_without_the_columns_is_refused(self):
        path = os.path.join(tempfile.mkdtemp(), "bad.csv")
        with open(path, "w", encoding="utf-8") as f:
            f.write("fraction,method\n1/8,uda\n")
        with self.assertRaisesRegex(ValueError, "lacks the column"):
            record.read_record(path)
        with self.assertRaisesRegex(ValueError, "No record at"):
            record.read_record(path + ".missing")

    def test_merge_replaces_the_same_run_and_keeps_the_others(self):
        old = [_row("uda", 0, 0.1), _row("strong_kl", 0, 0.2, tuning=True)]
        new = [_row("uda", 0, 0.3), _row("uda", 1, 0.4)]
        merged = record.merge(old, new)
        self.assertEqual(
            [(r["method"], r["seed"], r["mean_iou"]) for r in merged],
            [("uda", 0, 0.3), ("strong_kl", 0, 0.2), ("uda", 1, 0.4)],
        )

    def test_differing_flags_leave_out_the_preset_and_the_run_names(self):
        args = [
            "--crop_height=88",
            "--model_dir=runs/x",
            "--seed=2",
            "--unsup_ratio=2",
            "--uda_loss=ce",
            "--crop_height=64",  # an override after the preset's value wins
        ]
        preset = {"crop_height": 88, "unsup_ratio": 0}
        self.assertEqual(
            record.differing_flags(args, preset), "--crop_height=64 --unsup_ratio=2 --uda_loss=ce"
        )

    def test_record_row_reads_steps_and_classes_from_results(self):
        model_dir = tempfile.mkdtemp()
        evaluate.write_results(
            os.path.join(model_dir, "results.txt"),
            {"mean_iou": 0.5, "pixel_accuracy": 0.9, "iou/sky": 0.7, "iou/car": 0.3},
            global_step=1200,
        )
        run_row = {
            "fraction": "1/8",
            "sup_size": 46,
            "method": "uda",
            "seed": 0,
            "mean_iou": 0.5,
            "pixel_accuracy": 0.9,
            "wall_s": 12.0,
            "model_dir": model_dir,
        }
        row = record.record_row(run_row, flags="--unsup_ratio=2", tuning=False)
        self.assertEqual(row["steps"], 1200)
        self.assertAllClose([row["iou/sky"], row["iou/car"]], [0.7, 0.3])
        self.assertNotIn("sup_size", row)
        self.assertEqual(row["flags"], "--unsup_ratio=2")


class ReportTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.rows = record.read_record(_fake_record())

    def test_results_table_is_mean_and_std_without_tuning_runs(self):
        lines = record.results_table(self.rows).splitlines()
        self.assertLen(lines, 2 + 3)  # header, rule, 3 methods; the tuning run is not one
        self.assertIn(
            "| 1/8 | supervised | 2 | 41.0 ± 1.4 | 81.0 | 40.0, 42.0 (0,1) | 1200 | 10.0 |", lines
        )
        self.assertIn(
            "| 1/8 | uda_strong | 2 | 45.0 ± 1.4 | 84.5 | 44.0, 46.0 (0,1) | 1200 | 25.0 |", lines
        )

    def test_per_class_iou_of_the_best_recipe_vs_supervised(self):
        self.assertEqual(record.best_method(self.rows, "1/8"), "uda_strong")  # not strong_kl
        lines = record.per_class_table(self.rows, "1/8").splitlines()
        self.assertEqual(lines[0], "| class (1/8) | supervised | uda_strong | Δ |")
        self.assertIn("| sky | 91.0 | 96.0 | +5.0 |", lines)
        self.assertIn("| car | 31.0 | 38.0 | +7.0 |", lines)
        self.assertIn("| **mean_iou** | 41.0 | 45.0 | +4.0 |", lines)

    def test_paired_differences_are_seed_by_seed(self):
        lines = record.paired_table(self.rows).splitlines()
        self.assertLen(lines, 2 + 2)  # header, rule, uda and uda_strong
        self.assertIn("| 1/8 | uda | +1.0 (0), -1.0 (1) | +0.0 |", lines)
        self.assertIn("| 1/8 | uda_strong | +4.0 (0), +4.0 (1) | +4.0 |", lines)

    def test_a_tuning_reference_may_be_a_tuning_run(self):
        rows = self.rows + [
            _row("supervised_2400", 0, 0.50, tuning=True, reference=""),
            _row("uda_strong_2400", 0, 0.53, tuning=True, reference="supervised_2400"),
        ]
        self.assertIn("| 1/8 | uda_strong_2400 | 0 | 53.0 | +3.0 vs supervised_2400 |",
                      record.tuning_table(rows))  # fmt: skip

    def test_report_names_the_tuning_runs(self):
        text = record.report(self.rows)
        self.assertIn(
            "| 1/8 | strong_kl | 0 | 60.0 | +16.0 vs uda_strong | 90.0 | "
            "`--unsup_ratio=2 --uda_loss=kl` | 25.0 |",
            text,
        )
        self.assertIn("over 7 runs", text)

    def test_report_record_draws_the_plot_beside_the_csv(self):
        path = _fake_record()
        text = record.report_record(path, "fake")
        self.assertIn("| 1/8 | uda | 2 | 41.0 ± 0.0 |", text)
        self.assertGreater(os.path.getsize(os.path.splitext(path)[0] + ".png"), 1000)

    def test_update_record_keeps_rows_of_other_experiments(self):
        path = _fake_record()
        rows = record.update_record(path, [_row("uda", 0, 0.5)], "fake")
        self.assertLen(rows, 7)
        back = {(r["method"], r["seed"]): r for r in record.read_record(path)}
        self.assertEqual(back["uda", 0]["mean_iou"], 0.5)
        self.assertEqual(back["strong_kl", 0]["mean_iou"], 0.6)


if __name__ == "__main__":
    tf.test.main()
