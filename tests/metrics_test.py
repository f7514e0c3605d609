"""Tests of uda_tf/metrics.py: confusion matrix over valid pixels, IoU."""

import numpy as np
import tensorflow as tf

from tests import golden_values as gv
from uda_tf import metrics

CONFUSION = np.array(gv.IOU_CONFUSION)
IOU = np.array(gv.IOU_PER_CLASS)


class IouFromConfusionTest(tf.test.TestCase):
    def test_hand_example(self):
        self.assertAllClose(metrics.iou_from_confusion(CONFUSION), IOU)
        self.assertAllClose(metrics.mean_iou_from_confusion(CONFUSION), IOU.mean())

    def test_absent_class_is_nan_and_left_out_of_the_mean(self):
        cm = np.zeros((4, 4))
        cm[:3, :3] = CONFUSION
        iou = metrics.iou_from_confusion(cm)
        self.assertTrue(np.isnan(iou[3]))
        self.assertAllClose(metrics.mean_iou_from_confusion(cm), IOU.mean())

    def test_not_square_raises(self):
        with self.assertRaisesRegex(ValueError, "shape"):
            metrics.iou_from_confusion(np.zeros((2, 3)))


class ConfusionMatrixIoUTest(tf.test.TestCase):
    def _batch(self):
        """Labels / predictions giving CONFUSION, plus ignored pixels."""
        pairs = [(0, 0)] * 3 + [(0, 1)] + [(1, 1)] * 2 + [(2, 0)]
        labels = [t for t, _ in pairs] + [255, 255]
        preds = [p for _, p in pairs] + [2, 1]
        labels = np.array(labels, np.uint8).reshape(1, 3, 3)
        logits = tf.one_hot(np.array(preds).reshape(1, 3, 3), 3) * 5.0
        return labels, logits

    def test_accumulates_over_valid_pixels(self):
        metric = metrics.ConfusionMatrixIoU(3)
        labels, logits = self._batch()
        metric.update_state(labels, logits)
        self.assertAllEqual(metric.confusion, CONFUSION)
        self.assertAllClose(metric.per_class_iou(), IOU)
        self.assertAllClose(metric.result(), IOU.mean())
        metric.update_state(labels, tf.argmax(logits, -1))  # class ids work too
        self.assertAllEqual(metric.confusion, 2 * CONFUSION)
        self.assertAllClose(metric.result(), IOU.mean())
        metric.reset_state()
        self.assertAllEqual(metric.confusion, np.zeros((3, 3)))

    def test_matches_numpy_and_absent_class(self):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 4, size=(2, 8, 8)).astype(np.uint8)
        labels[labels == 3] = 255  # class 3 never appears in labels ...
        preds = rng.integers(0, 3, size=(2, 8, 8))  # ... nor in predictions
        metric = metrics.ConfusionMatrixIoU(4)
        metric.update_state(labels, tf.one_hot(preds, 4))
        valid = labels != 255
        cm = np.zeros((4, 4))
        np.add.at(cm, (labels[valid].astype(int), preds[valid]), 1)
        self.assertAllEqual(metric.confusion, cm)
        per_class = metric.per_class_iou().numpy()
        self.assertAllClose(per_class, metrics.iou_from_confusion(cm))
        self.assertTrue(np.isnan(per_class[3]))
        self.assertAllClose(metric.result(), metrics.mean_iou_from_confusion(cm))

    def test_config_round_trip(self):
        metric = metrics.ConfusionMatrixIoU(19, ignore_label=255, name="mean_iou")
        restored = metrics.ConfusionMatrixIoU.from_config(metric.get_config())
        self.assertEqual(restored.num_classes, 19)
        self.assertEqual(restored.name, "mean_iou")


if __name__ == "__main__":
    tf.test.main()
