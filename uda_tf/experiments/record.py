"""The record of an experiment: one CSV row per run, and the tables made from it.

    python -m uda_tf.experiments.label_efficiency --preset=cpu_pretrained \
        --record=docs/results/camvid_pretrained.csv ...        # the table's runs
    python -m uda_tf.experiments.ablations --preset=cpu_pretrained \
        --record=docs/results/camvid_pretrained.csv ...        # + tuning runs
    python -m uda_tf.experiments.label_efficiency --report_only \
        --record=docs/results/camvid_pretrained.csv            # the README's tables

Columns (FIELDS, then `iou/<class>` per class, in points of 1): the labeled
fraction, the method (a label_efficiency method, or for a tuning run the
ablation variant's name), the seed, mIoU, pixel accuracy, wall seconds, the
steps trained (results.txt's global_step), the uda_tf.main flags that differ
from the preset (space separated), whether it is a tuning run ("yes": chosen
on val, seed 0, never part of the mean ± std), the method a tuning run
changes (its reference, compared on the same seed; empty for the others), and
the run folder.

A record is rewritten whole (beside, then renamed) each time a run ends; rows
of another experiment writing to the same file are kept (`merge`). The plot
(mIoU vs labeled fraction, `plot`) goes beside it as `<name>.png`.
"""

import csv
import fractions as fractions_lib
import os

import numpy as np

from uda_tf import evaluate

FIELDS = (
    "fraction",
    "method",
    "seed",
    "mean_iou",
    "pixel_accuracy",
    "wall_s",
    "steps",
    "flags",
    "tuning",
    "reference",
    "model_dir",
)
# Flags that name a run rather than its recipe: never "differing from the preset".
RUN_KEYS = ("task_name", "data_dir", "model_dir", "sup_size", "seed", "do_train", "do_eval")
_FLOAT_FIELDS = ("mean_iou", "pixel_accuracy", "wall_s")


def parse_args(args: list[str]) -> dict[str, str]:
    """'--key=value' arguments -> {key: value}; the last of a repeated flag wins (as absl)."""
    out = {}
    for arg in args:
        key, _, value = arg.removeprefix("--").partition("=")
        out[key] = value
    return out


def differing_flags(args: list[str], preset: dict) -> str:
    """The flags of a run's command line whose value is not the preset's.

    Args:
      args: the uda_tf.main command line ('--key=value' strings).
      preset: the preset's {flag: value}.

    Returns:
      '--key=value' strings joined by spaces, in command-line order, leaving
      out RUN_KEYS.
    """
    parsed = parse_args(args)
    return " ".join(
        f"--{key}={value}"
        for key, value in parsed.items()
        if key not in RUN_KEYS and (key not in preset or str(preset[key]) != value)
    )


def record_row(run_row: dict, *, flags: str, tuning: bool, reference: str = "") -> dict:
    """One record row from a finished run (label_efficiency.execute's row).

    The per-class IoUs and the steps are read from the run's results.txt.
    """
    results = evaluate.parse_results(os.path.join(run_row["model_dir"], "results.txt"))
    row = {key: run_row.get(key) for key in FIELDS}
    row.update(
        steps=int(results.get("global_step", -1)),
        flags=flags,
        tuning=tuning,
        reference=reference,
        seed=int(row["seed"]),
    )
    row.update({k: v for k, v in results.items() if k.startswith("iou/")})
    return row


def _key(row: dict) -> tuple:
    return (bool(row["tuning"]), row["fraction"], row["method"], int(row["seed"]))


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """The rows of `existing`, those with the key of a new row replaced, then the other new ones.

    A row's key is (tuning, fraction, method, seed).
    """
    by_key = {_key(r): r for r in existing}
    for row in new:
        by_key[_key(row)] = row
    return list(by_key.values())


def write_record(path: str, rows: list[dict]) -> None:
    """Writes the rows (FIELDS, then every iou/<class> column met), beside, then renamed."""
    classes = list(dict.fromkeys(k for row in rows for k in row if k.startswith("iou/")))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS) + classes)
        writer.writeheader()
        for row in rows:
            out = {**row, "tuning": "yes" if row["tuning"] else "no"}
            writer.writerow({k: out.get(k, "") for k in writer.fieldnames})
    os.replace(partial, path)


def read_record(path: str) -> list[dict]:
    """The rows of a record, typed (seed and steps int, scores float, tuning bool).

    Raises:
      ValueError: if the file is missing or lacks a column of FIELDS.
    """
    if not os.path.exists(path):
        raise ValueError(f"No record at {path}.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}.")
        rows = list(reader)
    for row in rows:
        row["seed"], row["steps"] = int(row["seed"]), int(row["steps"])
        row["tuning"] = row["tuning"] == "yes"
        for key in list(row):
            if key in _FLOAT_FIELDS or key.startswith("iou/"):
                row[key] = float(row[key]) if row[key] != "" else float("nan")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values_np = np.asarray(values, np.float64)
    std = float(values_np.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values_np.mean()), std


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """{(fraction, method): rows sorted by seed} of the table's (non-tuning) rows."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if not row["tuning"]:
            groups.setdefault((row["fraction"], row["method"]), []).append(row)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def results_table(rows: list[dict]) -> str:
    """Mean ± std per (fraction, method) of the non-tuning rows, every seed listed."""
    lines = [
        (
            "| labeled fraction | method | runs | mIoU mean ± std | pixel acc. mean | every run "
            "(seeds) | steps | wall (min per run) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = _groups(rows)
    for (fraction, method), group in sorted(
        groups.items(), key=lambda kv: fractions_lib.Fraction(kv[0][0])
    ):
        mean, std = _mean_std([100 * r["mean_iou"] for r in group])
        accuracy = np.mean([100 * r["pixel_accuracy"] for r in group])
        every = ", ".join(f"{100 * r['mean_iou']:.1f}" for r in group)
        seeds = ",".join(str(r["seed"]) for r in group)
        steps = ",".join(sorted({str(r["steps"]) for r in group}))
        wall = np.nanmean([r["wall_s"] / 60 for r in group])
        lines.append(
            f"| {fraction} | {method} | {len(group)} | {mean:.1f} ± {std:.1f} | "
            f"{accuracy:.1f} | {every} ({seeds}) | {steps} | {wall:.1f} |"
        )
    return "\n".join(lines) + "\n"


def tuning_table(rows: list[dict]) -> str:
    """Every tuning run, with its flags and its difference with its reference's run of
    the same seed (tuning runs are chosen on val: never a result)."""
    lines = [
        (
            "| labeled fraction | tuning run | seed | mIoU | Δ vs reference (same seed) | "
            "pixel acc. | flags that differ from the preset | wall (min) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    # Every run by (fraction, method, seed); a table run wins over a tuning run of
    # the same name, and a reference may be a tuning variant (e.g. supervised_2400).
    runs = {(r["fraction"], r["method"], r["seed"]): r for r in rows if r["tuning"]}
    runs.update({(r["fraction"], r["method"], r["seed"]): r for r in rows if not r["tuning"]})
    for row in rows:
        if row["tuning"]:
            ref = runs.get((row["fraction"], row["reference"], row["seed"]))
            delta = "—"
            if ref is not None:
                diff = round(100 * (row["mean_iou"] - ref["mean_iou"]), 1) + 0.0
                delta = f"{diff:+.1f} vs {row['reference']}"
            lines.append(
                f"| {row['fraction']} | {row['method']} | {row['seed']} | "
                f"{100 * row['mean_iou']:.1f} | {delta} | {100 * row['pixel_accuracy']:.1f} | "
                f"`{row['flags']}` | {row['wall_s'] / 60:.1f} |"
            )
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], reference: str = "supervised") -> str:
    """Each method's mIoU minus the reference's on the same fraction and seed (the
    same labeled frames), seed by seed and on average; non-tuning rows only."""
    groups = _groups(rows)
    lines = [
        f"| labeled fraction | method | Δ mIoU vs {reference}, seed by seed | mean Δ |",
        "|---|---|---|---|",
    ]
    for (fraction, method), group in sorted(
        groups.items(), key=lambda kv: (fractions_lib.Fraction(kv[0][0]), kv[0][1])
    ):
        if method == reference:
            continue
        ref = {r["seed"]: r["mean_iou"] for r in groups.get((fraction, reference), [])}
        pairs = [(r["seed"], 100 * (r["mean_iou"] - ref[r["seed"]])) for r in group
                 if r["seed"] in ref]  # fmt: skip
        if not pairs:
            continue
        every = ", ".join(f"{d:+.1f} ({seed})" for seed, d in pairs)
        mean = round(float(np.mean([d for _, d in pairs])), 1) + 0.0
        lines.append(f"| {fraction} | {method} | {every} | {mean:+.1f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def best_method(rows: list[dict], fraction: str, reference: str = "supervised") -> str | None:
    """The non-reference method of the highest mean mIoU at a fraction (None if none)."""
    means = {
        method: np.mean([r["mean_iou"] for r in group])
        for (f, method), group in _groups(rows).items()
        if f == fraction and method != reference
    }
    return max(means, key=means.get) if means else None


def per_class_table(rows: list[dict], fraction: str, reference: str = "supervised") -> str:
    """Per-class IoU (mean over seeds) of the best method vs the reference at a fraction."""
    groups = _groups(rows)
    best = best_method(rows, fraction, reference)
    if best is None or (fraction, reference) not in groups:
        return ""
    ref_rows, best_rows = groups[fraction, reference], groups[fraction, best]
    classes = [k for k in ref_rows[0] if k.startswith("iou/")]
    lines = [
        f"| class ({fraction}) | {reference} | {best} | Δ |",
        "|---|---|---|---|",
    ]
    for key in classes + ["mean_iou", "pixel_accuracy"]:
        ref = 100 * np.nanmean([r[key] for r in ref_rows])
        ours = 100 * np.nanmean([r[key] for r in best_rows])
        name = key.removeprefix("iou/") if key.startswith("iou/") else f"**{key}**"
        lines.append(f"| {name} | {ref:.1f} | {ours:.1f} | {round(ours - ref, 1) + 0.0:+.1f} |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict]) -> str:
    """The markdown of a record: results, per-class IoU of the best recipe, tuning runs."""
    parts = [results_table(rows)]
    paired = paired_table(rows)
    if paired:
        parts.append(paired)
    fractions = sorted({r["fraction"] for r in rows if not r["tuning"]}, key=fractions_lib.Fraction)
    for fraction in fractions:
        table = per_class_table(rows, fraction)
        if table:
            parts.append(table)
    if any(r["tuning"] for r in rows):
        parts.append(tuning_table(rows))
    total = float(np.nansum([r["wall_s"] for r in rows]))
    parts.append(f"Total training wall time: {total / 60:.1f} min over {len(rows)} runs.\n")
    return "\n".join(parts)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std of mIoU (in points) per (fraction, method), in run order."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["fraction"], row["method"]), []).append(100 * row["mean_iou"])
    out = []
    for (fraction, method), values in groups.items():
        values_np = np.asarray(values)
        std = float(values_np.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(
            {
                "fraction": fraction,
                "method": method,
                "n": len(values),
                "mean": float(values_np.mean()),
                "std": std,
                "values": values,
            }
        )
    return out


def plot(summary: list[dict], path: str, title: str) -> None:
    """mIoU vs labeled fraction, one line per method, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    for i, method in enumerate(methods):
        points = sorted(
            (float(fractions_lib.Fraction(s["fraction"])), s["mean"], s["std"], s["values"])
            for s in summary
            if s["method"] == method
        )
        x, y, e, values = zip(*points)
        # Each method nudged sideways so that the methods' bars and dots do not overlap.
        nudge = 2 ** (0.06 * (i - (len(methods) - 1) / 2))
        x_nudged = [xi * nudge for xi in x]
        bar = ax.errorbar(
            x_nudged, y, yerr=e, marker="o", capsize=4, label=f"{method} (mean ± std, runs)"
        )
        run_x = [xi for xi, vs in zip(x_nudged, values) for _ in vs]
        run_y = [v for vs in values for v in vs]
        ax.scatter(run_x, run_y, s=14, alpha=0.5, color=bar[0].get_color())
    fractions = sorted({s["fraction"] for s in summary}, key=fractions_lib.Fraction)
    ticks = [float(fractions_lib.Fraction(f)) for f in fractions]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, fractions)
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
    ax.set_xlabel("labeled fraction of the train set")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.3 * (high - low))  # room for the legend above the data
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_record(path: str, new_rows: list[dict], title: str) -> list[dict]:
    """Merges rows into the record at `path` (kept rows: other experiments'), and
    redraws its plot beside it (`<name>.png`, the non-tuning rows).

    Returns:
      every row of the record.
    """
    existing = read_record(path) if os.path.exists(path) else []
    rows = merge(existing, new_rows)
    write_record(path, rows)
    table_rows = [r for r in rows if not r["tuning"]]
    if table_rows:
        plot(summarize(table_rows), os.path.splitext(path)[0] + ".png", title)
    return rows


def report_record(path: str, title: str) -> str:
    """The record's markdown tables (`report`); its plot is redrawn.

    Raises:
      ValueError: if there is no record at `path`.
    """
    rows = read_record(path)
    table_rows = [r for r in rows if not r["tuning"]]
    if table_rows:
        plot(summarize(table_rows), os.path.splitext(path)[0] + ".png", title)
    return report(rows)
