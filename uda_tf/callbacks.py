"""Keras callbacks of a training run: stop, checkpoint, TensorBoard, dev evaluation, CSV.

One epoch is --save_steps steps; the callbacks act at the end of each
execution (--iterations steps: logs) and of each epoch (checkpoint, images,
evaluation along training). Steps are read from the optimizer, so that a
resumed run logs at the true global step.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from uda_tf import checkpoints, common, evaluate
from uda_tf import config as config_lib
from uda_tf.data import sources, streams
from uda_tf.uda_model import TerminateOnNonFiniteLoss

# Dev mIoU along training, a line "<step> <mIoU>" per evaluation (--dev_size).
DEV_LOG_FILE = "dev_results.txt"
# The epoch logs (a row per --save_steps: losses, lr, dev mIoU).
TRAINING_LOG_FILE = "training_log.csv"
# The largest panel (input | prediction | ground truth) written to TensorBoard.
MAX_PANEL_WIDTH = 1536


def _metadata(plugin_name: str, data_class: int) -> bytes:
    metadata = summary_pb2.SummaryMetadata(data_class=data_class)
    metadata.plugin_data.plugin_name = plugin_name
    return metadata.SerializeToString()


# TensorBoard's scalar and image summary formats, written with core TF only
# (tf.summary.write), so that logging does not need the tensorboard package.
_SCALAR_METADATA = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
_IMAGE_METADATA = _metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)


def write_scalar(name: str, value: float) -> None:
    """A TensorBoard scalar at the default writer's step."""
    tf.summary.write(name, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)


def write_images(name: str, images: np.ndarray) -> None:
    """TensorBoard images (uint8 [n, H, W, 3]) at the default writer's step."""
    height, width = images.shape[1:3]
    encoded = [tf.io.encode_png(image) for image in images]
    tensor = tf.stack([tf.as_string(width), tf.as_string(height)] + encoded)
    tf.summary.write(name, tensor, metadata=_IMAGE_METADATA)


def global_step(model: keras.Model) -> int:
    return int(model.optimizer.iterations.numpy())


class StopAtStep(keras.callbacks.Callback):
    """Stops training once the optimizer has done `train_steps` steps."""

    def __init__(self, train_steps: int):
        super().__init__()
        self.train_steps = train_steps

    def on_train_batch_end(self, batch, logs=None):
        if global_step(self.model) >= self.train_steps:
            self.model.stop_training = True


class CheckpointSaver(keras.callbacks.Callback):
    """Saves model_dir/ckpt-<step> at the end of every epoch (every --save_steps).

    It runs after the other callbacks (the epoch's logs are written first: a
    run killed while saving resumes at the previous checkpoint and rewrites
    them, see `truncate_logs`). A kill never breaks the previous checkpoint:
    the manager writes the new one beside it (ckpt-<step>_temp/, then renames),
    names it in the state file (a rename), and only then deletes the ones
    beyond --max_save (uda_tf/checkpoints.py).
    """

    def __init__(self, manager: tf.train.CheckpointManager):
        super().__init__()
        self.manager = manager

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        path = self.manager.save(checkpoint_number=step)
        logging.info("Saved checkpoint %s", path)


class ScalarSummaries(keras.callbacks.Callback):
    """Writes every log key (losses, ratios, lr) to TensorBoard at the global step."""

    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        with self.writer.as_default(step=step):
            for key, value in (logs or {}).items():
                write_scalar(key, float(value))


class CSVLogger(keras.callbacks.CSVLogger):
    """Keras's CSVLogger without the empty `val_*` columns it adds for fit's validation."""

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None:
            self.keys = sorted(logs or {})
        super().on_epoch_end(epoch, logs)


def _keep_lines(path: str, keep, *, header: bool) -> None:
    """Rewrites `path` (beside, then renamed) with the lines whose first field `keep` accepts.

    The header line (if any) is kept; a last line without its newline (a
    write cut short) is dropped.
    """
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        lines = f.readlines()
    kept = lines[:1] if header else []
    for line in lines[len(kept) :]:
        first = line.replace(",", " ").split(maxsplit=1)[:1]
        if line.endswith("\n") and first and first[0].isdigit() and keep(int(first[0])):
            kept.append(line)
    if kept != lines:
        checkpoints.write_atomically(path, "".join(kept))


def truncate_logs(model_dir: str, *, step: int, first_epoch: int) -> None:
    """Drops what the logs hold past `step`, where a run resumes (epoch `first_epoch`).

    The resumed run logs that future again: the rows of training_log.csv from
    epoch `first_epoch` on and the lines of dev_results.txt from `step` on
    (its dev evaluation runs again when training begins) go, so that the
    logs read as those of one run.
    """
    _keep_lines(os.path.join(model_dir, TRAINING_LOG_FILE), lambda e: e < first_epoch, header=True)
    _keep_lines(os.path.join(model_dir, DEV_LOG_FILE), lambda s: s < step, header=False)


def _resize_panels(panels: np.ndarray) -> np.ndarray:
    """uint8 [n, H, 3W, 3], shrunk so that 3W <= MAX_PANEL_WIDTH."""
    height, width = panels.shape[1:3]
    if width <= MAX_PANEL_WIDTH:
        return panels
    size = [max(1, height * MAX_PANEL_WIDTH // width), MAX_PANEL_WIDTH]
    resized = tf.image.resize(panels, size, method="area")
    return tf.cast(tf.round(resized), tf.uint8).numpy()


class EvalSummaries(keras.callbacks.Callback):
    """At each epoch end: prediction images and, with --dev_size, dev mIoU.

    Uses the EMA network. With --dev_size the dev split is also evaluated when
    training begins (step 0 of a fresh run: the untrained network, near
    chance), so that the logs show mIoU rising from there. The dev results go
    to TensorBoard (model_dir/eval, `dev/mean_iou`, `dev/iou/<class>`) and
    into the epoch logs as `dev/mean_iou` (CSV, History); with `dev_log_path`
    each evaluation also appends a line "<step> <mIoU>" to that file.
    """

    def __init__(
        self, cfg: config_lib.Config, writer, *, info, vis_batch, dev_dataset, dev_log_path=None
    ):
        super().__init__()
        self.cfg = cfg
        self.dev_log_path = dev_log_path
        self.writer = writer
        self.info = info
        self.vis_batch = vis_batch
        self.dev_dataset = dev_dataset

    def on_train_begin(self, logs=None):
        if self.dev_dataset is not None:
            self._evaluate_dev(global_step(self.model))

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        if self.vis_batch is not None:
            network = self.model.ema_network
            predictions = evaluate.predict_batch(network, self.vis_batch).numpy()
            panels = np.stack(
                [
                    evaluate.panel(image, prediction, mask, self.info.palette)
                    for image, prediction, mask in zip(
                        evaluate.display_image(self.vis_batch).numpy(),
                        predictions,
                        self.vis_batch[common.MASK].numpy(),
                    )
                ]
            )
            with self.writer.as_default(step=step):
                write_images("input|prediction|ground_truth", _resize_panels(panels))
        if self.dev_dataset is None:
            return
        mean_iou = self._evaluate_dev(step)
        if logs is not None:
            logs["dev/mean_iou"] = mean_iou

    def _evaluate_dev(self, step: int) -> float:
        """Dev mIoU of the EMA network, written to TensorBoard and the log."""
        results = evaluate.evaluate(
            self.model.ema_network,
            self.dev_dataset,
            class_names=self.info.class_names,
            ignore_label=self.cfg.data.ignore_label,
        )
        with self.writer.as_default(step=step):
            for key, value in results.items():
                write_scalar(f"dev/{key}", value)
        logging.info(
            "Step %d, dev mIoU %.4f on %d images.",
            step,
            results["mean_iou"],
            self.cfg.train.dev_size,
        )
        if self.dev_log_path:
            with open(self.dev_log_path, "a", encoding="utf-8") as f:
                f.write(f"{step} {results['mean_iou']:.6f}\n")
        return results["mean_iou"]


def eval_input(
    cfg: config_lib.Config,
    num_images: int = -1,
    *,
    split: str | None = None,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """Evaluation batches of a split: all of it, or its first `num_images`.

    Args:
      cfg: the run's config.
      num_images: -1 for all.
      split: default --eval_split; "dev" is --dev_size images held out of train.
      batch_size: default --eval_batch_size.
    """
    dataset = streams.eval_dataset(cfg.data, split=split or cfg.data.eval_split)
    if num_images < 0 and batch_size is None:
        return dataset
    return dataset.unbatch().take(num_images).batch(batch_size or cfg.data.eval_batch_size)


def training_callbacks(cfg: config_lib.Config, model, manager, *, chief: bool) -> list:
    """The callbacks of a run, in order (non-chief workers write no files but checkpoints).

    Args:
      cfg: the run's config.
      model: the UdaModel.
      manager: its CheckpointManager (a temporary directory on non-chief workers).
      chief: whether this process writes TensorBoard and CSV files.
    """
    train_cfg = cfg.train
    model_dir = train_cfg.model_dir
    if chief:
        train_writer = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
        eval_writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
    else:
        train_writer = eval_writer = tf.summary.create_noop_writer()
    vis_batch = None
    if train_cfg.num_vis_images > 0:
        num_vis = train_cfg.num_vis_images
        vis_batch = next(iter(eval_input(cfg, num_vis, batch_size=num_vis)))
    dev_dataset = eval_input(cfg, split="dev") if train_cfg.dev_size > 0 else None
    callbacks = [
        TerminateOnNonFiniteLoss(),
        StopAtStep(train_cfg.train_steps),
        ScalarSummaries(train_writer),
        EvalSummaries(
            cfg,
            eval_writer,
            info=sources.dataset_info(cfg.data),
            vis_batch=vis_batch,
            dev_dataset=dev_dataset,
            dev_log_path=os.path.join(model_dir, DEV_LOG_FILE) if chief else None,
        ),
    ]
    if chief:
        path = os.path.join(model_dir, TRAINING_LOG_FILE)
        callbacks.append(CSVLogger(path, append=True))
    callbacks.append(CheckpointSaver(manager))  # Last: after the epoch's logs.
    return callbacks
