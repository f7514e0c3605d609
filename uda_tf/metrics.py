"""Confusion matrix and IoU over valid pixels.

Rows are ground truth, columns predictions (as cityscapesscripts'
confMatrix[gt][pred] and tf.math.confusion_matrix). IoU_c = TP / (TP + FP +
FN); a class that appears in neither the labels nor the predictions has no
IoU (NaN) and is left out of the mean, as cityscapesscripts does.
"""

import keras
import numpy as np
import tensorflow as tf


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU of a confusion matrix.

    Args:
      confusion: [K, K] counts, rows = ground truth, columns = prediction.

    Returns:
      float64 [K]: TP / (TP + FP + FN), NaN where that union is 0.

    Raises:
      ValueError: if `confusion` is not square.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be [K, K], got shape {cm.shape}.")
    true_pos = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - true_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_pos / np.where(union > 0, union, 1.0), np.nan)


def mean_iou_from_confusion(confusion: np.ndarray) -> float:
    """Mean IoU over the classes that have one (see `iou_from_confusion`)."""
    iou = iou_from_confusion(confusion)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


@keras.saving.register_keras_serializable(package="uda_tf")
class ConfusionMatrixIoU(keras.metrics.Metric):
    """Accumulates a K x K confusion matrix over valid pixels; result = mIoU.

    Pixels whose label is `ignore_label` are left out. The counts are kept in
    `count_dtype` (float64 by default: exact up to 2^53 pixels per cell; float32
    would stop counting exactly at 2^24). Under tf.distribute the counts are
    summed over replicas when read in a cross-replica context.

    Args:
      num_classes: K.
      ignore_label: label of unlabeled pixels.
      count_dtype: dtype of the counts ("float64", or "int32"/"float32" where
        64-bit types are unavailable, e.g. TPU).
      name: metric name, the log key.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        count_dtype: str = "float64",
        name: str = "mean_iou",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if num_classes < 2:
            raise ValueError(f"--num_classes={num_classes!r} is invalid: expected > 1.")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.count_dtype = count_dtype
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype=count_dtype,
            name="confusion",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch.

        Args:
          y_true: int [N, H, W] labels (`ignore_label` = unlabeled).
          y_pred: float [N, H, W, K] logits or probabilities, or int [N, H, W]
            predicted class ids.
          sample_weight: unused; must be None.
        """
        if sample_weight is not None:
            raise ValueError("ConfusionMatrixIoU takes no sample_weight.")
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.dtype.is_floating:
            y_pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)  # [N, H, W]
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])  # [P]
        preds = tf.reshape(tf.cast(y_pred, tf.int32), [-1])  # [P]
        valid = tf.not_equal(labels, self.ignore_label)  # [P]
        batch_cm = tf.math.confusion_matrix(
            tf.where(valid, labels, 0),
            preds,
            num_classes=self.num_classes,
            weights=tf.cast(valid, self.count_dtype),
            dtype=self.count_dtype,
        )
        self.confusion.assign_add(batch_cm)

    def per_class_iou(self) -> tf.Tensor:
        """float32 [K]: IoU per class, NaN where the class has no union."""
        cm = tf.cast(self.confusion, tf.float64)
        true_pos = tf.linalg.diag_part(cm)
        union = tf.reduce_sum(cm, 0) + tf.reduce_sum(cm, 1) - true_pos
        iou = tf.where(
            union > 0, true_pos / tf.maximum(union, 1.0), tf.constant(np.nan, tf.float64)
        )
        return tf.cast(iou, tf.float32)

    def result(self):
        iou = self.per_class_iou()
        present = tf.logical_not(tf.math.is_nan(iou))
        num_present = tf.reduce_sum(tf.cast(present, tf.float32))
        total = tf.reduce_sum(tf.where(present, iou, tf.zeros_like(iou)))
        return total / tf.maximum(num_present, 1.0)

    def reset_state(self):
        self.confusion.assign(tf.zeros((self.num_classes, self.num_classes), self.count_dtype))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            ignore_label=self.ignore_label,
            count_dtype=self.count_dtype,
        )
        return config
