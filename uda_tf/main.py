"""Trains and evaluates UDA for semantic segmentation, as the original's image/main.py.

    python -m uda_tf.main --data_dir=/data/cityscapes --model_dir=ckpt/run \\
        --unsup_ratio=7 --uda_confidence_thresh=0.8 --uda_softmax_temp=0.4 --do_eval

Writes model_dir/FLAGS.json at the start and model_dir/results.txt (mIoU and
the IoU of each class) at the end of an evaluation, as the original; between
them checkpoints (ckpt-<step>), TensorBoard logs (train/, eval/), a CSV log
and colourised predictions (predictions/). FLAGS.json and labeled_files.txt
are written (beside, then renamed) only once every check has passed, just
before the first step, so that a run refused for its flags or files leaves
a trained model_dir's config as it was. Restarting the same command resumes
from the newest checkpoint that reads back whole.
"""

import dataclasses
import functools
import json
import os
import sys

import keras
import tensorflow as tf
from absl import app, flags, logging

from flags import uda_flags
from uda_tf import callbacks, checkpoints, common, evaluate, train
from uda_tf import config as config_lib
from uda_tf.callbacks import eval_input
from uda_tf.data import sources

RESULTS_FILE = "results.txt"
PREDICTIONS_DIR = "predictions"
# The labeled subset (--sup_size, --seed), one FILENAME a line: runs can be compared.
LABELED_FILES = "labeled_files.txt"


def _check_data(cfg: config_lib.Config):
    """Checks that the flags fit the dataset, before training; returns its DatasetInfo.

    Raises:
      ValueError: --num_classes differs from the dataset's, or a crop is larger
        than the (first evaluation) image.
    """
    info = sources.check_num_classes(cfg.data)
    if not cfg.train.do_train:
        return info
    first = next(iter(eval_input(cfg, 1, batch_size=1)))
    height, width = first[common.IMAGE].shape[1:3]
    for flag, crop, size in (
        ("crop_height", cfg.data.crop_height, height),
        ("crop_width", cfg.data.crop_width, width),
    ):
        if crop > size:
            raise ValueError(
                f"--{flag}={crop} is invalid: larger than the images ({height}x{width}, "
                f"e.g. {first[common.FILENAME][0].numpy().decode()})."
            )
    return info


# Flags that fix the variables of a checkpoint: a resumed run must keep them.
_RESUME_FIXED = (
    (
        "model",
        (
            "model_name",
            "num_classes",
            "backbone",
            "output_stride",
            "backbone_width",
            "decoder_filters",
            "unet_depth",
            "unet_filters",
        ),
    ),
    ("train", ("mixed_precision",)),
)


def _check_resumable(cfg: config_lib.Config) -> None:
    """Raises ValueError if model_dir holds checkpoints of a differently built model.

    Any checkpoint file counts, broken or not: its FLAGS.json must agree.
    """
    model_dir = cfg.train.model_dir
    if not checkpoints.checkpoint_files(model_dir):
        return
    previous = train.read_config(model_dir)
    changed = []
    for part, names in _RESUME_FIXED:
        now, before = getattr(cfg, part), getattr(previous, part)
        changed += [
            f"--{name}={getattr(now, name)!r} (was {getattr(before, name)!r})"
            for name in names
            if getattr(now, name) != getattr(before, name)
        ]
    if changed:
        raise ValueError(
            f"--model_dir={model_dir} holds checkpoints of another model: {', '.join(changed)}. "
            "Keep these flags to resume, or use another --model_dir."
        )


def final_evaluation(cfg, network, info, *, step: int, chief: bool) -> dict[str, float]:
    """Full-resolution evaluation of `network`; writes results.txt and predictions."""
    model_dir = cfg.train.model_dir
    results = evaluate.evaluate(
        network, eval_input(cfg), class_names=info.class_names, ignore_label=cfg.data.ignore_label
    )
    logging.info(
        "Evaluation of step %d on %s:\n%s",
        step,
        cfg.data.eval_split,
        evaluate.format_table(results, info.class_names),
    )
    if not chief:
        return results
    evaluate.write_results(os.path.join(model_dir, RESULTS_FILE), results, global_step=step)
    with tf.summary.create_file_writer(os.path.join(model_dir, "eval")).as_default(step=step):
        for key, value in results.items():
            callbacks.write_scalar(key, value)
    if cfg.train.num_vis_images > 0:
        evaluate.write_predictions(
            network,
            eval_input(cfg, cfg.train.num_vis_images),
            os.path.join(model_dir, PREDICTIONS_DIR),
            palette=info.palette,
            num_images=cfg.train.num_vis_images,
        )
    return results


def _log_outputs(cfg: config_lib.Config, results: dict[str, float]) -> None:
    model_dir = cfg.train.model_dir
    lines = [
        f"config:       {os.path.join(model_dir, train.FLAGS_FILE)}",
        f"checkpoints:  {tf.train.latest_checkpoint(model_dir)}",
        f"TensorBoard:  tensorboard --logdir={model_dir}",
    ]
    if cfg.train.do_train:
        lines.append(f"labeled set:  {os.path.join(model_dir, LABELED_FILES)}")
        lines.append(f"training log: {os.path.join(model_dir, 'training_log.csv')}")
        if cfg.train.dev_size > 0:
            lines.append(f"dev mIoU:     {os.path.join(model_dir, callbacks.DEV_LOG_FILE)}")
    if results:
        lines.append(
            f"results:      {os.path.join(model_dir, RESULTS_FILE)} "
            f"(mIoU {100 * results['mean_iou']:.2f}%)"
        )
        if cfg.train.num_vis_images > 0:
            lines.append(f"predictions:  {os.path.join(model_dir, PREDICTIONS_DIR)}")
    logging.info("Outputs:\n  %s", "\n  ".join(lines))


def _prepare(cfg: config_lib.Config, strategy: tf.distribute.Strategy):
    """Seeds and checks; returns (cfg, dataset info, chief, labeled FILENAMEs or None)."""
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    train.check_replicas(cfg, strategy)
    synchronized = cfg.model.synchronized_bn and strategy.num_replicas_in_sync > 1
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, synchronized_bn=synchronized)
    )
    chief = train.is_chief(strategy)
    if cfg.train.do_train:
        _check_resumable(cfg)
        if chief:
            train.make_model_dir(cfg.train.model_dir)
    else:
        # Evaluation only: the network is the run's, whatever the model flags say.
        saved = train.read_config(cfg.train.model_dir)
        cfg = dataclasses.replace(cfg, model=saved.model).validate()
    logging.info("Config:\n%s", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    info = _check_data(cfg)
    labeled = sources.labeled_filenames(cfg.data) if cfg.train.do_train else None
    return cfg, info, chief, labeled


def _write_run_files(cfg: config_lib.Config, labeled: list[str]) -> None:
    """labeled_files.txt, then FLAGS.json, each written beside, then renamed."""
    path = os.path.join(cfg.train.model_dir, LABELED_FILES)
    temp = f"{path}.tmp-{os.getpid()}"
    sources.write_file_list(temp, labeled)
    tf.io.gfile.rename(temp, path, overwrite=True)
    train.write_config(cfg, cfg.train.model_dir)


def run(
    cfg: config_lib.Config,
    *,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int = 2,
) -> dict[str, float]:
    """Runs what the config asks: train, then evaluate.

    Args:
      cfg: a validated config (`uda_flags.config_from_flags`).
      strategy: overrides --strategy (tests).
      verbose: Keras progress-bar verbosity.

    Returns:
      The evaluation results (`evaluate.results_from_confusion`), {} without --do_eval.

    Raises:
      ValueError: naming the flag, file or directory at fault.
      FloatingPointError, tf.errors.InvalidArgumentError: a NaN or Inf loss,
        naming the step and each loss term.
    """
    if not cfg.train.model_dir:
        raise ValueError("--model_dir is required.")
    strategy = strategy or train.create_strategy(cfg.train)
    cfg, info, chief, labeled = _prepare(cfg, strategy)
    model_dir = cfg.train.model_dir
    results = {}
    policy = keras.mixed_precision.global_policy()
    try:
        if cfg.train.do_train:
            if cfg.train.mixed_precision:
                keras.mixed_precision.set_global_policy(train.mixed_precision_policy(cfg.train))
            model, optimizer = train.build_uda_model(cfg, strategy)
            run_files = functools.partial(_write_run_files, cfg, labeled) if chief else None
            train.train(cfg, strategy, model, optimizer, verbose=verbose, on_ready=run_files)
            network, step = model.ema_network, int(optimizer.iterations.numpy())
        else:
            path = train.latest_checkpoint(model_dir)
            network = train.load_inference_model(model_dir, path)
            step = train.checkpoint_step(path)
        if cfg.train.do_eval:
            results = final_evaluation(cfg, network, info, step=step, chief=chief)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    if chief:
        _log_outputs(cfg, results)
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        cfg = uda_flags.config_from_flags(flags.FLAGS)
    except ValueError as error:
        sys.exit(f"uda_tf.main: error: {error}")
    run(cfg, verbose=1 if sys.stdout.isatty() else 2)


if __name__ == "__main__":
    uda_flags.define_flags()
    app.run(main)
