"""Evaluation at the labels' stored size: confusion matrix, per-class IoU, mIoU, pictures.

The network (the EMA one, in training runs) sees each val image whole, at
the resolution it trains at (--resize_factor); when the labels are larger or
smaller (`streams.eval_dataset` keeps them at their stored size), its logits
are resized bilinearly to the labels' size, then the argmax is scored. The
confusion matrix counts the pixels whose label is not `ignore_label`
(uda_tf.metrics.ConfusionMatrixIoU), as cityscapesscripts' pixel-level
evaluation does on the 19 trainId classes.

In a batch of frames of different sizes (padded to the largest), the padded
logits are resized to the padded labels: each frame's prediction is then
within about one stored pixel of its own resize. Frames of one size (CamVid,
Cityscapes) are resized exactly.
"""

import os
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from uda_tf import common, metrics
from uda_tf.data import base

# One tf.function per network, so that repeated evaluations do not retrace.
_PREDICT_FNS = weakref.WeakKeyDictionary()


def predict_fn(network: keras.Model):
    """A tf.function: uint8/float images [b, h, w, 3] -> int32 class ids [b, h, w].

    Called as `predict(images, size)` with int32 [2] (H, W), the logits are
    resized bilinearly to [b, H, W, K] before the argmax.
    """
    if network not in _PREDICT_FNS:

        @tf.function(reduce_retracing=True)
        def predict(images, size=None):
            logits = network(tf.cast(images, tf.float32), training=False)  # [b, h, w, K]
            if size is not None:
                logits = tf.image.resize(logits, size, method="bilinear")  # [b, H, W, K]
            return tf.argmax(logits, axis=-1, output_type=tf.int32)

        _PREDICT_FNS[network] = predict
    return _PREDICT_FNS[network]


def predict_batch(network: keras.Model, batch: dict[str, tf.Tensor]) -> tf.Tensor:
    """Class ids of an evaluation batch at its labels' size.

    Args:
      network: images [b, h, w, 3] in [0, 255] -> logits [b, h, w, K].
      batch: {IMAGE uint8 [b, h, w, 3], MASK uint8 [b, H, W], ...}.

    Returns:
      int32 [b, H, W]: the argmax of the logits, resized bilinearly to (H, W)
      when it differs from (h, w).
    """
    images = batch[common.IMAGE]
    label_size = tuple(batch[common.MASK].shape[1:3])
    if tuple(images.shape[1:3]) == label_size:
        return predict_fn(network)(images)
    return predict_fn(network)(images, tf.constant(label_size, tf.int32))


def display_image(batch: dict[str, tf.Tensor]) -> tf.Tensor:
    """uint8 [b, H, W, 3]: the images of an evaluation batch at its labels' size."""
    return batch.get(common.STORED_IMAGE, batch[common.IMAGE])


def confusion_matrix(
    network: keras.Model, dataset: tf.data.Dataset, *, num_classes: int, ignore_label: int
) -> np.ndarray:
    """Counts (label, prediction) pairs over the valid pixels of a dataset.

    Args:
      network: images [b, h, w, 3] in [0, 255] -> logits [b, h, w, K].
      dataset: batches {IMAGE: uint8 [b, h, w, 3], MASK: uint8 [b, H, W]};
        the predictions are scored at (H, W) (`predict_batch`).
      num_classes: K.
      ignore_label: label of the pixels left out.

    Returns:
      float64 [K, K], rows = ground truth, columns = prediction.

    Raises:
      ValueError: if the dataset is empty.
    """
    metric = metrics.ConfusionMatrixIoU(num_classes, ignore_label=ignore_label)
    num_images = 0
    for batch in dataset:
        metric.update_state(batch[common.MASK], predict_batch(network, batch))
        num_images += int(batch[common.IMAGE].shape[0])
    if num_images == 0:
        raise ValueError("The evaluation dataset is empty.")
    logging.info("Evaluated %d images.", num_images)
    return np.asarray(metric.confusion.numpy(), np.float64)


def results_from_confusion(confusion: np.ndarray, class_names) -> dict[str, float]:
    """The log keys of an evaluation.

    Args:
      confusion: [K, K] counts (see `confusion_matrix`).
      class_names: K names (snake_case).

    Returns:
      {"mean_iou", "pixel_accuracy", "iou/<class_name>" for each class}; the
      IoU of a class absent from labels and predictions is NaN and left out of
      the mean.
    """
    iou = metrics.iou_from_confusion(confusion)
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} classes.")
    total = float(np.sum(confusion))
    results = {
        "mean_iou": metrics.mean_iou_from_confusion(confusion),
        "pixel_accuracy": float(np.trace(confusion)) / total if total else float("nan"),
    }
    results.update({f"iou/{name}": float(v) for name, v in zip(class_names, iou)})
    return results


def evaluate(
    network: keras.Model, dataset: tf.data.Dataset, *, class_names, ignore_label: int
) -> dict[str, float]:
    """`results_from_confusion` of `confusion_matrix` over the dataset, with
    one class per name."""
    confusion = confusion_matrix(
        network, dataset, num_classes=len(class_names), ignore_label=ignore_label
    )
    return results_from_confusion(confusion, class_names)


def format_table(results: dict[str, float], class_names) -> str:
    """A per-class IoU table (percent), mIoU last."""
    width = max(len(n) for n in list(class_names) + ["mean IoU"])
    lines = [f"{'class':<{width}}  IoU (%)"]
    for name in class_names:
        lines.append(f"{name:<{width}}  {100 * results[f'iou/{name}']:7.2f}")
    lines.append(f"{'mean IoU':<{width}}  {100 * results['mean_iou']:7.2f}")
    return "\n".join(lines)


def write_results(path: str, results: dict[str, float], *, global_step: int) -> None:
    """Writes results.txt: `key = value` lines, as the original's results file.

    Args:
      path: the file (model_dir/results.txt).
      results: see `results_from_confusion`.
      global_step: the step of the evaluated weights.
    """
    lines = [f"global_step = {global_step}"]
    lines += [f"{key} = {value:.6f}" for key, value in results.items()]
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_results(path: str) -> dict[str, float]:
    """Reads a results.txt written by `write_results`."""
    results = {}
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            if line.strip():
                key, value = line.split(" = ")
                results[key] = float(value)
    return results


def colorize(labels: np.ndarray, palette) -> np.ndarray:
    """uint8 [H, W, 3]: each class id in its palette colour, others black.

    Args:
      labels: int [H, W] class ids (ignore and unknown values become black).
      palette: K (r, g, b) triples.
    """
    table = np.zeros([256, 3], np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.clip(labels, 0, 255).astype(np.uint8)]


def panel(image: np.ndarray, prediction: np.ndarray, mask: np.ndarray, palette) -> np.ndarray:
    """uint8 [H, 3W, 3]: input | prediction | ground truth, side by side."""
    return np.concatenate(
        [np.asarray(image, np.uint8), colorize(prediction, palette), colorize(mask, palette)],
        axis=1,
    )


def _stem(filename) -> str:
    name = filename.decode() if isinstance(filename, bytes) else str(filename)
    return base.example_id(name) or "image"


def write_predictions(
    network: keras.Model,
    dataset: tf.data.Dataset,
    output_dir: str,
    *,
    palette,
    num_images: int,
) -> list[str]:
    """Writes colourised predictions of the first images of a dataset.

    For each image, `<name>_pred.png` (a palette PNG whose pixel values are
    the class ids) and `<name>_panel.png` (input | prediction | ground truth),
    at the labels' size (`predict_batch`, `display_image`).

    Args:
      network: images -> logits (the EMA network).
      dataset: batches {IMAGE, MASK, FILENAME, optional STORED_IMAGE}.
      output_dir: created if needed.
      palette: K (r, g, b) triples.
      num_images: how many images.

    Returns:
      The paths written.
    """
    tf.io.gfile.makedirs(output_dir)
    flat_palette = np.zeros([256, 3], np.uint8)
    flat_palette[: len(palette)] = np.asarray(palette, np.uint8)
    paths = []
    for batch in dataset:
        predictions = predict_batch(network, batch).numpy()
        images = display_image(batch).numpy()
        for i, prediction in enumerate(predictions):
            if len(paths) >= 2 * num_images:
                return paths
            stem = _stem(batch[common.FILENAME][i].numpy())
            indexed = Image.fromarray(prediction.astype(np.uint8), mode="P")
            indexed.putpalette(flat_palette.reshape(-1).tolist())
            picture = panel(images[i], prediction, batch[common.MASK][i].numpy(), palette)
            for suffix, pil in (("pred", indexed), ("panel", Image.fromarray(picture))):
                path = os.path.join(output_dir, f"{stem}_{suffix}.png")
                with tf.io.gfile.GFile(path, "wb") as f:
                    pil.save(f, format="PNG")
                paths.append(path)
    return paths
