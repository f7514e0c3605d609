"""Ablations of UDA's knobs at one labeled fraction: what moves UDA's gain.

    python -m uda_tf.experiments.ablations --task_name=camvid \
        --data_dir=../shared/data/camvid_240x180 --fraction=1/8 --seeds=1 \
        --output_dir=runs/ablations

Each variant is a method of uda_tf.experiments.label_efficiency (the same
preset: model, crop, steps, schedule) with one change of flags; `supervised`
and `uda` (the preset's UDA) are the references. A variant's runs live in
`output_dir/<variant>/` under label_efficiency's names and resume the same way
(a run whose results.txt exists is not repeated). The output folder gets
`ablations.csv` (every run) and `ablations.md` (one row per variant: every
run's mIoU, the mean, and the difference with its reference over the same
seeds). Flags given after `--` go to every run. `--report_only` trains nothing
and reports the finished runs among those planned.

The `strong_*` variants tune `uda_strong` (the field's recipe) one change at
a time. With `--record=docs/results/<name>.csv` every variant with flags is
written to that record as a tuning run (seed 0 only, `--seeds=1`), beside the
label-efficiency runs of the same record; the reference methods are recorded
by label_efficiency.
"""

import csv
import dataclasses
import math
import os

import numpy as np
from absl import app, flags

from uda_tf.experiments import label_efficiency as le
from uda_tf.experiments import record as record_lib


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the ablation: a method of label_efficiency plus flags."""

    method: str
    flags: tuple[str, ...]
    change: str
    reference: str = "supervised"


# In the order of the table. The `uda` method's flags are le.UDA_FLAGS.
VARIANTS = {
    "supervised": Variant("supervised", (), "no unlabeled loss (--unsup_ratio=0)", ""),
    "uda": Variant("uda", (), "the preset's UDA: T 0.4, thresh 0.8, r 2, coeff 1, 15 ops + Cutout"),
    "thresh0.5": Variant("uda", ("--uda_confidence_thresh=0.5",), "confidence threshold 0.5"),
    "plain_kl": Variant(
        "uda",
        ("--uda_softmax_temp=-1", "--uda_confidence_thresh=-1"),
        "no sharpening, no confidence mask (the original's flag defaults)",
    ),
    "tsa_linear": Variant("uda", ("--tsa=linear_schedule",), "TSA, linear schedule"),
    "ratio1": Variant("uda", ("--unsup_ratio=1",), "unsup_ratio 1 (half the unlabeled images)"),
    "photometric": Variant(
        "uda", ("--aug_ops=photometric",), "aug view without shear, translate, rotate"
    ),
    "coeff2": Variant("uda", ("--unsup_coeff=2",), "unsup_coeff 2"),
    "bn_inference": Variant(
        "uda",
        ("--uda_target=inference",),
        "target from a separate inference-mode pass (no BN sharing)",
    ),
    "ema_target": Variant(
        "uda", ("--uda_target=ema",), "target from the EMA network (a mean teacher)"
    ),
    "uda_strong": Variant(
        "uda_strong",
        (),
        "the field's recipe: colour view + CutMix, CE to the EMA teacher's argmax, thresh 0.95",
    ),
    "strong_kl": Variant(
        "uda_strong",
        ("--uda_loss=kl", "--uda_softmax_temp=0.4"),
        "KL to the teacher sharpened at T 0.4 instead of CE to its argmax",
        "uda_strong",
    ),
    "strong_thresh0.8": Variant(
        "uda_strong", ("--uda_confidence_thresh=0.8",), "confidence threshold 0.8", "uda_strong"
    ),
    "strong_inference": Variant(
        "uda_strong",
        ("--uda_target=inference",),
        "target from the network in inference mode, not the EMA teacher",
        "uda_strong",
    ),
    "strong_shared": Variant(
        "uda_strong",
        ("--uda_target=shared",),
        "target from the shared training-mode pass (UDA's), not the EMA teacher",
        "uda_strong",
    ),
    "strong_cutout": Variant(
        "uda_strong",
        ("--aug_cutout=true",),
        "RandAugment's always-on Cutout on the colour view (the first recipe)",
        "uda_strong",
    ),
    "strong_coeff0.5": Variant(
        "uda_strong", ("--unsup_coeff=0.5",), "unsup_coeff 0.5", "uda_strong"
    ),
    "strong_hue0": Variant(
        "uda_strong",
        ("--aug_color_hue=0",),
        "no hue jitter in the colour view (sky and tree lose most under UniMatch's 0.25)",
        "uda_strong",
    ),
    "strong_sigma0.5": Variant(
        "uda_strong",
        ("--aug_color_max_sigma=0.5",),
        "blur sigma in [0.1, 0.5] instead of [0.1, 2.0]: UniMatch's range relative to a"
        " 500-pixel VOC frame, scaled to our 120-pixel one",
        "uda_strong",
    ),
    "strong_flip": Variant(
        "uda_strong",
        ("--uda_target_flip=true",),
        "the teacher's target averaged with its prediction on the mirrored originals",
        "uda_strong",
    ),
    "strong_no_cutmix": Variant(
        "uda_strong", ("--unsup_mix=none",), "no CutMix between the unlabeled images", "uda_strong"
    ),
    "strong_randaugment": Variant(
        "uda_strong",
        ("--aug_policy=randaugment",),
        "UDA's RandAugment (no Cutout, as the frozen recipe) as the strong view instead of the colour one",
        "uda_strong",
    ),
    "uda_selftrain": Variant(
        "uda_selftrain",
        (),
        "the field's recipe, its targets from the supervised variant's run of the seed, fixed",
        "supervised",
    ),
    "selftrain_thresh_off": Variant(
        "uda_selftrain",
        ("--uda_confidence_thresh=-1",),
        "self-training on every pixel's hard label, no confidence mask (ST++)",
        "uda_selftrain",
    ),
    "selftrain_thresh_off_coeff1": Variant(
        "uda_selftrain",
        ("--uda_confidence_thresh=-1", "--unsup_coeff=1.0"),
        "the same at consistency weight 1 (ST++ weighs labeled and pseudo-labeled pixels alike)",
        "selftrain_thresh_off",
    ),
    "selftrain_thresh_off_flip": Variant(
        "uda_selftrain",
        ("--uda_confidence_thresh=-1", "--uda_target_flip=true"),
        "the same, the teacher's targets averaged over the mirrored originals (Naive-Student)",
        "selftrain_thresh_off",
    ),
    "supervised_2400": Variant(
        "supervised", ("--train_steps=2400", "--save_steps=800"), "supervised, 2x steps", ""
    ),
    "uda_strong_2400": Variant(
        "uda_strong",
        ("--train_steps=2400", "--save_steps=800"),
        "uda_strong, 2x steps",
        "supervised_2400",
    ),
    "supervised_4800": Variant(
        "supervised", ("--train_steps=4800", "--save_steps=1200"), "supervised, 4x steps", ""
    ),
    "uda_4800": Variant(
        "uda", ("--train_steps=4800", "--save_steps=1200"), "UDA, 4x steps", "supervised_4800"
    ),
    "uda_strong_4800": Variant(
        "uda_strong",
        ("--train_steps=4800", "--save_steps=1200"),
        "uda_strong, 4x steps",
        "supervised_4800",
    ),
    "uda_strong_4800_coeff0.5": Variant(
        "uda_strong",
        ("--train_steps=4800", "--save_steps=1200", "--unsup_coeff=0.5"),
        "uda_strong, 4x steps, unsup_coeff 0.5",
        "supervised_4800",
    ),
    "supervised_9600": Variant(
        "supervised", ("--train_steps=9600", "--save_steps=1200"), "supervised, 8x steps", ""
    ),
    "uda_strong_9600_coeff0.5": Variant(
        "uda_strong",
        ("--train_steps=9600", "--save_steps=1200", "--unsup_coeff=0.5"),
        "uda_strong, 8x steps, unsup_coeff 0.5",
        "supervised_9600",
    ),
}
CSV_FIELDS = ("variant",) + le.CSV_FIELDS


def plan(
    *, output_dir: str, names: list[str], fraction: str, num_seeds: int, num_train: int
) -> list[tuple[str, le.Run]]:
    """(variant name, run) for every variant and seed, in the order they run.

    Raises:
      ValueError: naming an unknown variant.
    """
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}.")
    le.check_teacher_order(
        names,
        lambda n: le.TEACHER_OF.get(VARIANTS[n].method),
        flag="variants",
        teacher="variant's run",
    )
    sup_size = le.sup_size_for(fraction, num_train)
    out = []
    for name in names:
        method = VARIANTS[name].method
        for seed in range(num_seeds):
            model_dir = os.path.join(output_dir, name, le.run_name(fraction, method, seed))
            out.append((name, le.Run(fraction, sup_size, method, seed, model_dir)))
    return out


def teacher_dir(output_dir: str, run: le.Run) -> str | None:
    """The teacher of a self-training run (None for others): the run of its seed of the
    variant named as its le.TEACHER_OF method (for uda_selftrain, the supervised variant)."""
    method = le.TEACHER_OF.get(run.method)
    if method is None:
        return None
    return os.path.join(output_dir, method, le.run_name(run.fraction, method, run.seed))


def table(rows: list[dict]) -> str:
    """The markdown table: a row per variant, with its difference to its reference.

    The difference is the mean over the seeds that the variant and its
    reference both have, so that a variant is never compared with other seeds.
    """
    by_variant: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[row["seed"]] = row
    lines = [
        (
            "| variant | change | runs | mIoU of each seed | mean "
            "| Δ vs reference (same seeds) | wall (min per run) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, seeds in by_variant.items():
        variant = VARIANTS[name]
        values = {s: 100 * r["mean_iou"] for s, r in sorted(seeds.items())}
        every = ", ".join(f"{v:.1f}" for v in values.values())
        delta = "—"
        reference = by_variant.get(variant.reference, {})
        common = sorted(set(values) & set(reference))
        if common:
            diff = np.mean([values[s] - 100 * reference[s]["mean_iou"] for s in common])
            diff = round(float(diff), 1) + 0.0  # no "-0.0"
            delta = f"{diff:+.1f} vs {variant.reference} (seeds {','.join(map(str, common))})"
        walls = [r["wall_s"] / 60 for r in seeds.values() if not math.isnan(r["wall_s"])]
        wall = f"{np.mean(walls):.1f}" if walls else "—"
        lines.append(
            f"| {name} | {variant.change} | {len(values)} | {every} | "
            f"{np.mean(list(values.values())):.1f} | {delta} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def tuning_row(name: str, run_row: dict, args: list[str], preset: dict) -> dict:
    """The record row of a variant's run: a tuning run, named by the variant."""
    row = record_lib.record_row(
        run_row,
        flags=record_lib.differing_flags(args, preset),
        tuning=True,
        reference=VARIANTS[name].reference,
    )
    return {**row, "method": name}


def write_outputs(rows: list[dict], output_dir: str) -> None:
    """ablations.csv and ablations.md in output_dir."""
    with open(os.path.join(output_dir, "ablations.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "ablations.md"), "w", encoding="utf-8") as f:
        f.write(table(rows))


def define_flags() -> None:
    flags.DEFINE_string("task_name", "camvid", "Dataset: camvid, cityscapes or custom.")
    flags.DEFINE_string("data_dir", None, "The dataset root.")
    flags.DEFINE_string("fraction", "1/8", "The labeled fraction.")
    flags.DEFINE_integer("seeds", 1, "Seeds per variant (0..seeds-1).")
    flags.DEFINE_list(
        "variants",
        # The 4x-step pair, the uda_strong tuning and self-training on request.
        [
            n
            for n in VARIANTS
            if not n.endswith("_4800") and "strong" not in n and "selftrain" not in n
        ],
        f"Some of {list(VARIANTS)}.",
    )
    flags.DEFINE_enum("preset", "cpu", list(le.PRESETS), "Model, crop and schedule preset.")
    flags.DEFINE_string("output_dir", "runs/ablations", "Where runs and reports go.")
    flags.DEFINE_integer("num_train", None, "Train-set size (default: the task's).")
    le.define_record_flags()
    flags.DEFINE_bool(
        "report_only",
        False,
        "Train nothing: report the finished runs among those planned (e.g. 3 seeds of the "
        "references and 1 of the other variants).",
    )


def main(argv: list[str]) -> None:
    cfg = flags.FLAGS
    num_train = le.check_common_flags(cfg)
    (fraction,) = le.parse_fractions(cfg.fraction)
    if cfg.record and cfg.seeds != 1:
        raise app.UsageError(
            f"--record takes tuning runs of seed 0 only: --seeds=1, not {cfg.seeds}."
        )
    try:
        preset = le.preset_values(cfg.preset, cfg.weights_dir)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    planned = plan(
        output_dir=cfg.output_dir,
        names=cfg.variants,
        fraction=fraction,
        num_seeds=cfg.seeds,
        num_train=num_train,
    )
    os.makedirs(cfg.output_dir, exist_ok=True)
    rows = []
    for name, run in planned:
        if cfg.report_only and not os.path.exists(os.path.join(run.model_dir, "results.txt")):
            continue
        extra = list(VARIANTS[name].flags) + argv[1:]
        args = le.run_flags(
            run,
            task_name=cfg.task_name,
            data_dir=cfg.data_dir,
            preset=cfg.preset,
            extra=extra,
            weights_dir=cfg.weights_dir,
            teacher=teacher_dir(cfg.output_dir, run),
        )
        rows.append({"variant": name, **le.execute(run, args)})
        write_outputs(rows, cfg.output_dir)  # a report after every run, as label_efficiency
        if cfg.record and VARIANTS[name].flags:
            record_lib.update_record(
                cfg.record,
                [tuning_row(name, rows[-1], args, preset)],
                f"{cfg.task_name}, preset {cfg.preset}",
            )
    if not rows:
        write_outputs(rows, cfg.output_dir)
    with open(os.path.join(cfg.output_dir, "ablations.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"CSV: {os.path.join(cfg.output_dir, 'ablations.csv')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
