"""Cityscapes label tables: labelId -> trainId, the 19 class names, the palette.

The tables follow cityscapesscripts.helpers.labels (the official definition):
19 evaluated classes get trainIds 0..18; every other labelId (0-6, 9, 10,
14-16, 18, 29, 30 and -1, the license plate) maps to 255 = ignore.

Label PNGs (`*_gtFine_labelIds.png`) are uint8, so the labelId -1 can only
appear there as 255; both spellings map to ignore. Any other value (34..254,
or < -1 in an int tensor) is not a Cityscapes labelId: `is_label_id` finds
them so that readers can name the file that holds them.
"""

import numpy as np
import tensorflow as tf

from uda_tf import common

IGNORE_LABEL = common.IGNORE_LABEL
NUM_CLASSES = 19

# labelId -> trainId for the 19 evaluated classes (SPEC.md §2).
LABEL_ID_TO_TRAIN_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
TRAIN_ID_TO_LABEL_ID = {t: i for i, t in LABEL_ID_TO_TRAIN_ID.items()}

# Every labelId of the official table: 0..33 and -1 (license plate).
LABEL_IDS = tuple(range(34)) + (-1,)
VOID_LABEL_IDS = tuple(i for i in LABEL_IDS if i not in LABEL_ID_TO_TRAIN_ID)

# Some labelIds by name, for generators and tests.
UNLABELED_ID = 0
EGO_VEHICLE_ID = 1
LICENSE_PLATE_ID = -1

# Per trainId, snake_case so that they can be log keys (`iou/<name>`).
CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# The official colour of each trainId (cityscapesscripts `Label.color`).
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)


def train_id_table() -> np.ndarray:
    """uint8 [256]: trainId of each uint8 labelId value (255 stands for -1).

    Values that are not labelIds map to IGNORE_LABEL here; use
    `valid_label_id_table` to tell them apart.
    """
    table = np.full([256], IGNORE_LABEL, np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


def valid_label_id_table() -> np.ndarray:
    """bool [256]: whether each uint8 value is a Cityscapes labelId."""
    valid = np.zeros([256], bool)
    valid[[i % 256 for i in LABEL_IDS]] = True
    return valid


def _table_index(label_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """int32 index into the 256-entry tables, and whether it is in range."""
    label_ids = tf.convert_to_tensor(label_ids)
    if label_ids.dtype == tf.uint8:
        return tf.cast(label_ids, tf.int32), tf.ones_like(label_ids, tf.bool)
    if not label_ids.dtype.is_integer:
        raise ValueError(f"labelIds must be an integer tensor, got dtype {label_ids.dtype.name}.")
    ids = tf.cast(label_ids, tf.int64)
    # In a wider int type, -1 is the license plate and 255 is not a labelId.
    in_range = (ids >= -1) & (ids <= 254)
    index = tf.where(ids == -1, tf.constant(255, tf.int64), ids)
    return tf.cast(tf.clip_by_value(index, 0, 255), tf.int32), in_range


def label_ids_to_train_ids(label_ids: tf.Tensor) -> tf.Tensor:
    """Maps Cityscapes labelIds to trainIds (255 = ignore).

    Args:
      label_ids: integer tensor of any shape: uint8 as read from a
        `*_labelIds.png` (255 stands for -1), or a wider int type holding
        ids 0..33 and -1 (where 255 is not a labelId).

    Returns:
      uint8 tensor, same shape: trainIds 0..18, or 255 for void ids. Values
      that are not labelIds also give 255: check them with `is_label_id`.

    Raises:
      ValueError: if `label_ids` is not an integer tensor.
    """
    index, _ = _table_index(label_ids)
    return tf.gather(tf.constant(train_id_table()), index)


def is_label_id(label_ids: tf.Tensor) -> tf.Tensor:
    """bool tensor, same shape: True where the value is a Cityscapes labelId.

    Args:
      label_ids: integer tensor, as for `label_ids_to_train_ids`.
    """
    index, in_range = _table_index(label_ids)
    return tf.gather(tf.constant(valid_label_id_table()), index) & in_range
