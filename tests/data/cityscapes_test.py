"""Tests of uda_tf/data/cityscapes.py against the official cityscapesscripts table."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from cityscapesscripts.helpers import labels as cs_labels

from uda_tf import common
from uda_tf.data import cityscapes


def _official_train_id(label) -> int:
    # The official table gives trainId 255 or -1 (license plate) to ignored ids.
    return 255 if label.trainId in (255, -1) else label.trainId


class CityscapesTest(tf.test.TestCase, parameterized.TestCase):
    def test_every_label_id_maps_as_the_official_table(self):
        ids = [label.id for label in cs_labels.labels]
        self.assertCountEqual(ids, cityscapes.LABEL_IDS)
        expected = [_official_train_id(label) for label in cs_labels.labels]
        got = cityscapes.label_ids_to_train_ids(tf.constant(ids, tf.int32))
        self.assertEqual(got.dtype, tf.uint8)
        self.assertAllEqual(got, expected)
        self.assertAllEqual(cityscapes.is_label_id(tf.constant(ids, tf.int32)), [True] * len(ids))

    def test_uint8_label_ids_as_read_from_png(self):
        # In a uint8 PNG, -1 (license plate) can only be 255.
        ids = [label.id % 256 for label in cs_labels.labels]
        expected = [_official_train_id(label) for label in cs_labels.labels]
        got = cityscapes.label_ids_to_train_ids(tf.constant(ids, tf.uint8))
        self.assertAllEqual(got, expected)

    def test_void_ids_are_ignored(self):
        void = [label.id for label in cs_labels.labels if _official_train_id(label) == 255]
        self.assertCountEqual(void, cityscapes.VOID_LABEL_IDS)
        self.assertCountEqual(void, [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, -1])
        got = cityscapes.label_ids_to_train_ids(tf.constant(void, tf.int64))
        self.assertAllEqual(got, [common.IGNORE_LABEL] * len(void))

    @parameterized.named_parameters(
        ("uint8", tf.uint8, [34, 35, 100, 254]),
        ("int32", tf.int32, [34, 254, 255, 256, 300, -2, -100]),
        ("int64", tf.int64, [40, 1000, -5]),
    )
    def test_values_that_are_not_label_ids_are_detected(self, dtype, values):
        self.assertAllEqual(
            cityscapes.is_label_id(tf.constant(values, dtype)), [False] * len(values)
        )
        # They map to ignore, never to a class.
        mapped = cityscapes.label_ids_to_train_ids(tf.constant(values, dtype))
        self.assertAllEqual(mapped, [255] * len(values))

    def test_all_uint8_values(self):
        valid = cityscapes.is_label_id(tf.range(256, dtype=tf.int32)).numpy()
        self.assertEqual(valid.sum(), 34)  # 0..33; 255 is -1 only in uint8.
        valid8 = cityscapes.is_label_id(tf.cast(tf.range(256), tf.uint8)).numpy()
        self.assertAllEqual(np.nonzero(valid8)[0], list(range(34)) + [255])

    def test_shape_is_kept(self):
        x = tf.constant([[7, 8, 11], [26, 0, 33]], tf.uint8)
        out = cityscapes.label_ids_to_train_ids(x)
        self.assertAllEqual(out, [[0, 1, 2], [13, 255, 18]])

    def test_float_input_is_rejected(self):
        with self.assertRaisesRegex(ValueError, "integer"):
            cityscapes.label_ids_to_train_ids(tf.constant([7.0]))

    def test_class_names_and_palette_follow_the_official_table(self):
        by_train_id = {
            label.trainId: label for label in cs_labels.labels if 0 <= label.trainId < 255
        }
        self.assertLen(cityscapes.CLASS_NAMES, cityscapes.NUM_CLASSES)
        for train_id in range(cityscapes.NUM_CLASSES):
            label = by_train_id[train_id]
            self.assertEqual(cityscapes.CLASS_NAMES[train_id], label.name.replace(" ", "_"))
            self.assertEqual(cityscapes.PALETTE[train_id], label.color)
            self.assertEqual(cityscapes.TRAIN_ID_TO_LABEL_ID[train_id], label.id)


if __name__ == "__main__":
    tf.test.main()
