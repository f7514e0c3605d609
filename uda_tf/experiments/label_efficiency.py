"""Label efficiency: mIoU against the labeled fraction, supervised vs UDA.

    python -m uda_tf.experiments.label_efficiency --task_name=camvid \
        --data_dir=../shared/data/camvid_240x180 --fractions=1/16,1/8,1/4,1 \
        --seeds=3 --methods=supervised,uda --output_dir=runs/label_efficiency

Every configuration trains from scratch through `python -m uda_tf.main` with the
same model, crop, steps and schedule; the methods differ only in the unlabeled
loss (`--unsup_ratio=0` for supervised). A seed picks the labeled subset and
the initialisation, and both methods see the same subset for the same seed.
Each run's model_dir holds its results.txt; a run whose results.txt exists is
not repeated, so the command resumes where it stopped. The output folder gets
`runs.csv` (every run), `summary.md` (mean ± std per fraction and method) and
`label_efficiency.png` (mIoU vs labeled fraction, error bars = std).

Presets (`--preset`): `cpu` runs the 1/8 comparison (2 methods x 3 seeds) in
40 to 75 minutes on 2 cores (a supervised run 3-5 minutes, a UDA run 11-20,
depending on the machine); `cpu_pretrained` is DeepLabv3+ on the ImageNet
MobileNetV2 (alpha 0.35, read from --weights_dir, nothing downloaded) at the
same resolution (see the README for its cost); `gpu` is the full-size
recipe. Flags given after `--` go to every `uda_tf.main` call and override
the preset.

Methods (`--methods`, METHOD_FLAGS): `supervised` (--unsup_ratio=0), `uda`
(the original's recipe: RandAugment 15 ops + Cutout, KL to a target
sharpened at T 0.4, confidence 0.8) and `uda_strong` (the field's: colour
view + CutMix, cross-entropy to the mean teacher's argmax, confidence 0.95)
and `uda_selftrain` (the same, the targets from the finished `supervised`
run of the same fraction and seed, fixed: self-training; list `supervised`
before it, and count that run's time in its cost); `uda_selftrain2` is its
second round, the `uda_selftrain` run of the seed as the teacher.

`--record=docs/results/<name>.csv` also writes every run to that record
(uda_tf/experiments/record.py: one row per run, the flags that differ from
the preset, tuning or not) and its plot beside it (`<name>.png`);
`--report_only` trains nothing and prints the record's markdown tables.
"""

import csv
import dataclasses
import fractions as fractions_lib
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from uda_tf import evaluate
from uda_tf.experiments import record as record_lib
from uda_tf.experiments.record import plot, summarize

# <repo>/../shared/data/weights: where the pretrained preset's file is read
# (--weights_dir overrides it).
REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_WEIGHTS_DIR = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "weights")
# keras.applications' ImageNet MobileNetV2, alpha 0.35, without its classifier.
MOBILENET_V2_035 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"

# Every preset trains the same way for both methods: only unsup_ratio differs.
PRESETS = {
    "cpu": {
        "model_name": "unet",
        "unet_depth": 3,
        "unet_filters": 16,
        "resize_factor": 0.5,
        "crop_height": 80,
        "crop_width": 112,
        "min_scale": 0.75,
        "max_scale": 1.25,
        "train_batch_size": 4,
        "train_steps": 2400,
        "learning_rate": 0.05,
        "warmup_steps": 100,
        "weight_decay_rate": 5e-4,
        "moving_average_decay": 0.995,
        "eval_batch_size": 8,
        "save_steps": 600,
        "iterations": 50,
        "num_vis_images": 0,
    },
    # DeepLabv3+ on the ImageNet MobileNetV2 0.35 (a file name, resolved in
    # --weights_dir by `preset_values`), the `cpu` preset's frames (90x120,
    # scored at the stored 180x240) and labeled batch; the steps fit 3 methods
    # x 3 seeds in about 150 minutes on 2 cores (README).
    "cpu_pretrained": {
        "model_name": "deeplabv3plus",
        "backbone": "mobilenetv2",
        "backbone_width": 0.35,
        "backbone_weights": MOBILENET_V2_035,
        "decoder_filters": 64,
        "output_stride": 16,
        "resize_factor": 0.5,
        "crop_height": 88,
        "crop_width": 120,
        "min_scale": 0.75,
        "max_scale": 1.5,
        "train_batch_size": 4,
        "train_steps": 1200,
        "learning_rate": 0.01,
        "warmup_steps": 50,
        "weight_decay_rate": 1e-4,
        "moving_average_decay": 0.99,
        "eval_batch_size": 8,
        "save_steps": 400,
        "iterations": 50,
        "num_vis_images": 0,
    },
    "gpu": {
        "model_name": "deeplabv3plus",
        "backbone": "resnet50",
        "output_stride": 16,
        "crop_height": 360,
        "crop_width": 480,
        "min_scale": 0.5,
        "max_scale": 2.0,
        "train_batch_size": 16,
        "train_steps": 20000,
        "learning_rate": 0.03,
        "moving_average_decay": 0.9999,
        "save_steps": 2000,
        "iterations": 200,
    },
}
# UDA's own knobs (the original's GPU script), used by the `uda` method.
UDA_FLAGS = {
    "unsup_ratio": 2,
    "uda_confidence_thresh": 0.8,
    "uda_softmax_temp": 0.4,
    "unsup_coeff": 1.0,
}
# The field's recipe (FixMatch / UniMatch for segmentation): colour jitter,
# greyscale and blur for the strong view, CutMix between the unlabeled images,
# cross-entropy to the argmax of the mean teacher's prediction above 0.95,
# no Cutout.
STRONG_FLAGS = {
    "unsup_ratio": 2,
    "aug_policy": "color",
    "unsup_mix": "cutmix",
    "uda_loss": "ce",
    "uda_confidence_thresh": 0.95,
    "uda_softmax_temp": -1,
    "uda_target": "ema",
    "unsup_coeff": 1.0,
    # UniMatch's strong view has no Cutout; with RandAugment's always-on one it
    # scored 37.5 against 39.2 without (seed 0, val, tuning runs in the record).
    "aug_cutout": False,
}
# Each method's flags over the preset: only the unlabeled loss differs.
# Self-training (Noisy Student, ST++) with the field's views and loss: the
# targets come from the finished supervised run of the same fraction and seed
# (`teacher_dir`), fixed, instead of from the mean teacher; the supervised
# method must run first.
SELFTRAIN_FLAGS = {**STRONG_FLAGS, "uda_target": "teacher"}
METHOD_FLAGS = {
    "supervised": {"unsup_ratio": 0},
    "uda": UDA_FLAGS,
    "uda_strong": STRONG_FLAGS,
    "uda_selftrain": SELFTRAIN_FLAGS,
    "uda_selftrain2": SELFTRAIN_FLAGS,
}
# The method whose finished run of the same fraction and seed is each
# self-training method's teacher: a second round (Noisy Student's iteration,
# ST++'s re-training) learns from the first round's student.
TEACHER_OF = {"uda_selftrain": "supervised", "uda_selftrain2": "uda_selftrain"}
NUM_TRAIN = {"camvid": 367, "cityscapes": 2975}
METHODS = tuple(METHOD_FLAGS)
CSV_FIELDS = (
    "fraction",
    "sup_size",
    "method",
    "seed",
    "mean_iou",
    "pixel_accuracy",
    "wall_s",
    "steps",
    "model_dir",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration of the experiment."""

    fraction: str
    sup_size: int
    method: str
    seed: int
    model_dir: str


def parse_fractions(text: str) -> list[str]:
    """'1/16,1/8,1' -> ['1/16', '1/8', '1'], each checked to lie in (0, 1]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = fractions_lib.Fraction(item)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--fractions: {item!r} is not a fraction like 1/8.") from None
        if not 0 < value <= 1:
            raise ValueError(f"--fractions: {item!r} is not in (0, 1].")
        out.append(item)
    return out


def sup_size_for(fraction: str, num_train: int) -> int:
    """The labeled-set size of a fraction; -1 (all) for 1."""
    value = fractions_lib.Fraction(fraction)
    if value == 1:
        return -1
    return max(1, round(float(value) * num_train))


def run_name(fraction: str, method: str, seed: int) -> str:
    """The folder name of one run: '1/8', 'uda', 0 -> 'frac1of8_uda_seed0'."""
    return f"frac{fraction.replace('/', 'of')}_{method}_seed{seed}"


def check_common_flags(cfg) -> int:
    """Checks --data_dir and --seeds; returns the train-set size (--num_train or the task's).

    Raises:
      app.UsageError: naming the flag that is missing or out of range.
    """
    if not cfg.data_dir:
        raise app.UsageError("--data_dir is required.")
    if cfg.seeds < 1:
        raise app.UsageError(f"--seeds={cfg.seeds}: expected >= 1.")
    num_train = cfg.num_train or NUM_TRAIN.get(cfg.task_name)
    if not num_train:
        raise app.UsageError(f"--num_train is required for --task_name={cfg.task_name}.")
    return num_train


def plan_runs(
    *, output_dir, fraction_list, num_seeds, methods, num_train, first_seed=0
) -> list[Run]:
    """Every (fraction, seed, method) of the experiment, in the order they run.

    The seeds are first_seed .. first_seed + num_seeds - 1.
    """
    runs = []
    for fraction in fraction_list:
        sup_size = sup_size_for(fraction, num_train)
        for seed in range(first_seed, first_seed + num_seeds):
            for method in methods:
                model_dir = os.path.join(output_dir, run_name(fraction, method, seed))
                runs.append(Run(fraction, sup_size, method, seed, model_dir))
    return runs


def preset_values(preset: str, weights_dir: str | None = None) -> dict:
    """The preset's uda_tf.main flags, its backbone_weights file found in weights_dir.

    Args:
      preset: a key of PRESETS.
      weights_dir: where a preset's weights file is read (None:
        DEFAULT_WEIGHTS_DIR, <repo>/../shared/data/weights).

    Raises:
      ValueError: naming the weights file's path when it does not exist.
    """
    values = dict(PRESETS[preset])
    if values.get("backbone_weights"):
        path = os.path.join(weights_dir or DEFAULT_WEIGHTS_DIR, values["backbone_weights"])
        if not os.path.isfile(path):
            raise ValueError(
                f"--preset={preset} needs the ImageNet backbone file {path}, which does not "
                "exist; put it there or pass --weights_dir (nothing is downloaded)."
            )
        values["backbone_weights"] = path
    return values


def teacher_dir(run: Run) -> str:
    """The model_dir of the TEACHER_OF run of `run`'s fraction and seed, beside it."""
    name = run_name(run.fraction, TEACHER_OF[run.method], run.seed)
    return os.path.join(os.path.dirname(run.model_dir), name)


def check_methods(methods: list[str]) -> None:
    """Raises ValueError for an unknown method, or a teacher method not after its teacher."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected some of {METHODS}.")
    check_teacher_order(methods, TEACHER_OF.get, flag="methods", teacher="run")


def check_teacher_order(names: list[str], teacher_of, *, flag: str, teacher: str) -> None:
    """Raises ValueError, naming --<flag>, for a name with a teacher (`teacher_of(name)`,
    None for none) that is not listed before it: its `teacher` must exist first."""
    for name in names:
        first = teacher_of(name)
        if first is not None and (first not in names or names.index(first) > names.index(name)):
            raise ValueError(
                f"--{flag}={','.join(names)}: {name} learns from the {first} {teacher} of its "
                f"seed, so {first} must come before it."
            )


def run_flags(
    run: Run, *, task_name, data_dir, preset, extra, weights_dir=None, teacher=None
) -> list[str]:
    """The uda_tf.main command line of one run (see `preset_values` for weights_dir).

    A TEACHER_OF run learns from `teacher`, default `teacher_dir(run)`.
    """
    values = preset_values(preset, weights_dir)
    values.update(
        task_name=task_name,
        data_dir=data_dir,
        model_dir=run.model_dir,
        sup_size=run.sup_size,
        seed=run.seed,
        do_train=True,
        do_eval=True,
    )
    values.update(METHOD_FLAGS[run.method])
    if run.method in TEACHER_OF:
        values["uda_teacher_dir"] = teacher or teacher_dir(run)
    args = [f"--{key}={value}" for key, value in values.items()]
    return args + list(extra)


def execute(run: Run, args: list[str]) -> dict:
    """Trains and evaluates one run in a subprocess unless its results exist."""
    results_path = os.path.join(run.model_dir, "results.txt")
    timing_path = os.path.join(run.model_dir, "wall_seconds.txt")
    if not os.path.exists(results_path):
        os.makedirs(run.model_dir, exist_ok=True)
        logging.info("Running %s", run.model_dir)
        start = time.time()
        log_path = os.path.join(run.model_dir, "train.log")
        with open(log_path, "a", encoding="utf-8") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "uda_tf.main", *args],
                check=False,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"Run {run.model_dir} failed with exit code {proc.returncode}; see {log_path}."
            )
        with open(timing_path, "w", encoding="utf-8") as f:
            f.write(f"{time.time() - start:.1f}\n")
    else:
        logging.info("Skipping %s: results.txt exists", run.model_dir)
    results = evaluate.parse_results(results_path)
    wall = float("nan")
    if os.path.exists(timing_path):
        with open(timing_path, encoding="utf-8") as f:
            wall = float(f.read())
    return {
        "fraction": run.fraction,
        "sup_size": run.sup_size,
        "method": run.method,
        "seed": run.seed,
        "mean_iou": results["mean_iou"],
        "pixel_accuracy": results.get("pixel_accuracy", float("nan")),
        "wall_s": wall,
        "steps": int(results.get("global_step", -1)),
        "model_dir": run.model_dir,
    }


def markdown_table(summary: list[dict], total_wall_s: float) -> str:
    """The summary as a markdown table, every run's mIoU listed."""
    lines = [
        "| labeled fraction | method | runs | mIoU mean ± std | every run |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        every = ", ".join(f"{v:.1f}" for v in s["values"])
        lines.append(
            f"| {s['fraction']} | {s['method']} | {s['n']} | "
            f"{s['mean']:.1f} ± {s['std']:.1f} | {every} |"
        )
    lines.append("")
    lines.append(f"Total training wall time: {total_wall_s / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], output_dir: str, title: str) -> None:
    """runs.csv, summary.md and label_efficiency.png in output_dir."""
    with open(os.path.join(output_dir, "runs.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    total = float(np.nansum([row["wall_s"] for row in rows]))
    with open(os.path.join(output_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(summary, total))
    plot(summary, os.path.join(output_dir, "label_efficiency.png"), title)


def define_flags() -> None:
    flags.DEFINE_string("task_name", "camvid", "Dataset: camvid, cityscapes or custom.")
    flags.DEFINE_string("data_dir", None, "The dataset root.")
    flags.DEFINE_string("fractions", "1/16,1/8,1/4,1", "Labeled fractions, comma separated.")
    flags.DEFINE_integer(
        "seeds", 3, "Seeds per configuration (first_seed .. first_seed + seeds - 1)."
    )
    flags.DEFINE_integer(
        "first_seed",
        0,
        "The first seed: --first_seed=3 --seeds=3 runs seeds 3, 4 and 5, e.g. to add them to a "
        "record that holds seeds 0-2 of the same machine.",
        lower_bound=0,
    )
    flags.DEFINE_list("methods", ["supervised", "uda"], f"Some of {list(METHODS)}.")
    flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Model, crop and schedule preset.")
    flags.DEFINE_string("output_dir", "runs/label_efficiency", "Where runs and reports go.")
    flags.DEFINE_integer("num_train", None, "Train-set size (default: the task's).")
    define_record_flags()
    flags.DEFINE_bool(
        "report_only",
        False,
        "Train nothing: print the markdown tables of the --record CSV (and redraw its plot).",
    )


def define_record_flags() -> None:
    """--weights_dir and --record (label_efficiency and ablations)."""
    flags.DEFINE_string(
        "weights_dir",
        None,
        f"Where a preset's ImageNet backbone file is read (default {DEFAULT_WEIGHTS_DIR}).",
    )
    flags.DEFINE_string(
        "record",
        None,
        "A record CSV (e.g. docs/results/camvid_pretrained.csv) that every finished run is "
        "written to, its plot beside it; kept rows of other experiments.",
    )


def main(argv: list[str]) -> None:
    cfg = flags.FLAGS
    title = f"{cfg.task_name}, preset {cfg.preset}"
    if cfg.report_only:
        if not cfg.record:
            raise app.UsageError("--report_only reads the runs of a --record CSV.")
        if not (cfg["preset"].present and cfg["task_name"].present):
            # The record's runs say nothing of the default flags: name the plot by the record.
            title = os.path.splitext(os.path.basename(cfg.record))[0]
        print(record_lib.report_record(cfg.record, title))
        return
    num_train = check_common_flags(cfg)
    try:
        check_methods(cfg.methods)
        preset = preset_values(cfg.preset, cfg.weights_dir)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    os.makedirs(cfg.output_dir, exist_ok=True)
    runs = plan_runs(
        output_dir=cfg.output_dir,
        fraction_list=parse_fractions(cfg.fractions),
        num_seeds=cfg.seeds,
        methods=cfg.methods,
        num_train=num_train,
        first_seed=cfg.first_seed,
    )
    extra = argv[1:]
    rows = []
    for run in runs:
        args = run_flags(
            run,
            task_name=cfg.task_name,
            data_dir=cfg.data_dir,
            preset=cfg.preset,
            extra=extra,
            weights_dir=cfg.weights_dir,
        )
        rows.append(execute(run, args))
        write_outputs(rows, cfg.output_dir, title)
        if cfg.record:
            flags_text = record_lib.differing_flags(args, preset)
            new = record_lib.record_row(rows[-1], flags=flags_text, tuning=False)
            record_lib.update_record(cfg.record, [new], title)
    with open(os.path.join(cfg.output_dir, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"CSV: {os.path.join(cfg.output_dir, 'runs.csv')}")
    print(f"Plot: {os.path.join(cfg.output_dir, 'label_efficiency.png')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
