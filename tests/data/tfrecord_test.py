"""Damaged TFRecords: each fault is named (file, record) and no intact file is touched."""

import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile

import tensorflow as tf
from absl.testing import parameterized

from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes, preprocess, sources, tfrecord

_ROOT = None  # Set by setUpModule: a generated tree and its records.


def setUpModule():
    global _ROOT
    _ROOT = tempfile.mkdtemp()
    fake_cityscapes.generate(
        os.path.join(_ROOT, "cs"), num_train=6, num_val=3, num_extra=2, height=32, width=64
    )
    cfg = config_lib.DataConfig(data_dir=os.path.join(_ROOT, "cs"), use_train_extra=True)
    preprocess.preprocess_sup(cfg, os.path.join(_ROOT, "rec"), per_shard=4)
    preprocess.preprocess_unsup(cfg, os.path.join(_ROOT, "rec"), per_shard=4)


def tearDownModule():
    shutil.rmtree(_ROOT, ignore_errors=True)


def _digests(folder: str) -> dict[str, str]:
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _record_offsets(path: str) -> list[int]:
    """Byte offsets of the records of a TFRecord file, and the file size last."""
    with open(path, "rb") as f:
        data = f.read()
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 16 + struct.unpack("<Q", data[offset : offset + 8])[0]
    return offsets + [len(data)]


def _example(features: dict[str, bytes]) -> bytes:
    feature = {
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in features.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class DamagedRecordsTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = os.path.join(tempfile.mkdtemp(), "rec")
        self.addCleanup(shutil.rmtree, os.path.dirname(self.dir), ignore_errors=True)
        shutil.copytree(os.path.join(_ROOT, "rec"), self.dir)
        self.intact = _digests(self.dir)

    def _damage(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        self.intact.pop(name, None)
        return path

    def _read(self, name: str) -> bytes:
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read()

    def assertOthersIntact(self):
        now = _digests(self.dir)
        self.assertEqual({k: now.get(k) for k in self.intact}, self.intact)

    def _cfg(self, **kwargs) -> config_lib.DataConfig:
        return config_lib.DataConfig(data_dir=self.dir, **kwargs)

    def test_intact_records_count_as_written(self):
        for name, meta in tfrecord.read_info(self.dir)["sets"].items():
            shards = sorted(glob.glob(os.path.join(self.dir, f"{name}.tfrecord-*")))
            self.assertEqual(sum(map(tfrecord.count_records, shards)), meta["num_examples"])
        source = sources.labeled_source(self._cfg(), "train")
        self.assertLen(list(source.elements()), 6)

    @parameterized.named_parameters(
        ("at_a_record_boundary", -2, r"holds 3 records, but .*tfrecords.json says 4"),
        ("mid_record", None, r"record 2 \(at byte \d+ of \d+\) is truncated"),
    )
    def test_truncated_labeled_shard_is_named_when_the_set_is_opened(self, cut, message):
        # Before: a shard cut at a record boundary trained on fewer records (exit 0), one
        # cut mid-record stopped with "DataLossError: truncated record at N" (no file).
        name = "train-full.tfrecord-00000-of-00002"
        offsets = _record_offsets(os.path.join(self.dir, name))
        end = offsets[cut] if cut is not None else (offsets[2] + offsets[3]) // 2
        path = self._damage(name, self._read(name)[:end])
        with self.assertRaisesRegex(ValueError, f"{path}.*{message}|{message}.*{path}"):
            sources.labeled_source(self._cfg(), "train")
        self.assertOthersIntact()

    def test_missing_shard_is_named(self):
        path = os.path.join(self.dir, "train-full.tfrecord-00001-of-00002")
        os.remove(path)
        self.intact.pop(os.path.basename(path))
        with self.assertRaisesRegex(ValueError, f"'train-full'.* is incomplete: missing.*{path}"):
            sources.labeled_source(self._cfg(), "train")
        self.assertOthersIntact()

    def test_truncated_unlabeled_shard_is_named(self):
        name = "unsup.tfrecord-00001-of-00002"
        path = self._damage(name, self._read(name)[:-100])
        with self.assertRaisesRegex(ValueError, f"{path}: record 1 .* is truncated"):
            sources.unlabeled_source(self._cfg(unsup_ratio=1))
        self.assertOthersIntact()

    def test_corrupt_unlabeled_record_names_shard_and_record_when_read(self):
        # A flipped byte inside a record's data fails its CRC only when read.
        name = "unsup.tfrecord-00000-of-00002"
        offsets = _record_offsets(os.path.join(self.dir, name))
        data = bytearray(self._read(name))
        data[(offsets[1] + offsets[2]) // 2] ^= 0xFF
        path = self._damage(name, bytes(data))
        source = sources.unlabeled_source(self._cfg(unsup_ratio=1))
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, rf"{path}: record 1 of 4 could not be read"
        ):
            list(source.elements())
        self.assertOthersIntact()

    def test_corrupt_record_header_is_named(self):
        name = "val.tfrecord-00000-of-00001"
        offsets = _record_offsets(os.path.join(self.dir, name))
        data = bytearray(self._read(name))
        data[offsets[1] + 2] ^= 0x01  # The length of record 1.
        path = self._damage(name, bytes(data))
        with self.assertRaisesRegex(ValueError, f"{path}: record 1 .* corrupt: its length fails"):
            sources.labeled_source(self._cfg(), "val")
        self.assertOthersIntact()

    def test_record_without_label_names_shard_record_and_key(self):
        records = list(
            tf.data.TFRecordDataset(os.path.join(self.dir, "val.tfrecord-00000-of-00001"))
        )
        example = tf.train.Example.FromString(records[1].numpy())
        features = {k: v.bytes_list.value[0] for k, v in example.features.feature.items()}
        del features[tfrecord.LABEL_ENCODED]
        path = os.path.join(self.dir, "val.tfrecord-00000-of-00001")
        with tf.io.TFRecordWriter(path) as writer:
            for i, record in enumerate(records):
                writer.write(_example(features) if i == 1 else record.numpy())
        self.intact.pop(os.path.basename(path))
        source = sources.labeled_source(self._cfg(), "val")
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, rf"{path}, record 1: no label/encoded feature"
        ):
            list(source.elements())
        # The same fault in record 0 is found when the set is opened.
        with tf.io.TFRecordWriter(path) as writer:
            for i, record in enumerate(records):
                writer.write(_example(features) if i == 0 else record.numpy())
        with self.assertRaisesRegex(ValueError, rf"{path}: record 0 has no bytes feature \['label"):
            sources.labeled_source(self._cfg(), "val")
        self.assertOthersIntact()

    def test_bad_info_file_is_named(self):
        path = self._damage(tfrecord.INFO_FILE, b'{"task_name": "cityscapes", "sets": {')
        with self.assertRaisesRegex(ValueError, f"{path}: not valid JSON"):
            sources.labeled_source(self._cfg(), "val")
        self._damage(tfrecord.INFO_FILE, json.dumps({"sets": {"val": {}}}).encode())
        with self.assertRaisesRegex(ValueError, f"{path}: expected .*num_examples"):
            sources.labeled_source(self._cfg(), "val")
        self.assertOthersIntact()

    def test_list_longer_than_the_records_is_named(self):
        name = "val.txt"
        path = self._damage(name, self._read(name) + b"leftImg8bit/val/x/x_0_0_leftImg8bit.png\n")
        with self.assertRaisesRegex(ValueError, f"{path} lists 4 files, but set 'val' holds 3"):
            sources.labeled_source(self._cfg(), "val")
        self.assertOthersIntact()


if __name__ == "__main__":
    tf.test.main()
