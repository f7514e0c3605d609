"""Tests of `python -m uda_tf.data.preprocess`: folder -> TFRecords, lossless."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import pytest
import tensorflow as tf

from uda_tf import config as config_lib
from uda_tf.data import base, fake_cityscapes, preprocess, sources, tfrecord

_ROOT = None


def setUpModule():
    global _ROOT
    _ROOT = tempfile.mkdtemp()
    fake_cityscapes.generate(
        os.path.join(_ROOT, "cs"), num_train=7, num_val=2, num_extra=3, height=32, width=64
    )


def tearDownModule():
    shutil.rmtree(_ROOT, ignore_errors=True)


def _flags(**kwargs):
    values = {
        "task_name": "cityscapes", "data_type": "sup", "raw_data_dir": os.path.join(_ROOT, "cs"),
        "output_base_dir": "", "use_equal_split": False, "sup_size": -1, "dev_size": -1, "seed": 0,
        "aug_copy": 0, "aug_copy_start": 0, "data_source": "auto", "use_train_extra": False,
        "unlabeled_dir": None, "examples_per_shard": 2,
    }  # fmt: skip
    values.update(kwargs)
    return types.SimpleNamespace(**values)


def _records(output_dir: str, name: str) -> list[dict[str, bytes]]:
    shards = sorted(glob.glob(os.path.join(output_dir, f"{name}.tfrecord-*")))
    out = []
    for serialized in tf.data.TFRecordDataset(shards).as_numpy_iterator():
        example = tf.train.Example.FromString(serialized)
        out.append({k: v.bytes_list.value[0] for k, v in example.features.feature.items()})
    return out


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class PreprocessTest(tf.test.TestCase):
    def _out(self) -> str:
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def test_sup_records_are_lossless_and_list_the_chosen_files(self):
        out = self._out()
        preprocess.run(_flags(output_base_dir=out, sup_size=3, dev_size=2, seed=5))
        info = tfrecord.read_info(out)
        self.assertEqual(info["task_name"], "cityscapes")
        self.assertEqual(
            {k: v["num_examples"] for k, v in info["sets"].items()},
            {"train-size_3": 3, "dev-size_2": 2, "val": 2},
        )
        self.assertLen(glob.glob(os.path.join(out, "train-size_3.tfrecord-*-of-00002")), 2)
        cfg = config_lib.DataConfig(data_dir=os.path.join(_ROOT, "cs"), seed=5, sup_size=3)
        chosen = sources.labeled_filenames(cfg)
        listed = base.read_file_list(os.path.join(out, "train-size_3.txt"))
        self.assertEqual(listed, chosen)
        dev = base.read_file_list(os.path.join(out, "dev-size_2.txt"))
        self.assertEmpty(set(dev) & set(chosen))
        for name in ("train-size_3", "dev-size_2", "val"):
            records = _records(out, name)
            listed = base.read_file_list(os.path.join(out, f"{name}.txt"))
            self.assertEqual([r[tfrecord.IMAGE_FILENAME].decode() for r in records], listed)
            for r in records:
                image = os.path.join(_ROOT, "cs", r[tfrecord.IMAGE_FILENAME].decode())
                label = os.path.join(_ROOT, "cs", r[tfrecord.LABEL_FILENAME].decode())
                self.assertEqual(r[tfrecord.IMAGE_ENCODED], _file_bytes(image))
                self.assertEqual(r[tfrecord.LABEL_ENCODED], _file_bytes(label))
                self.assertTrue(label.endswith("_gtFine_labelIds.png"))

    def test_reading_the_records_back_gives_the_folder_elements(self):
        out = self._out()
        preprocess.run(_flags(output_base_dir=out, sup_size=4))
        cfg = config_lib.DataConfig(data_dir=os.path.join(_ROOT, "cs"), sup_size=4)
        folder = list(sources.labeled_source(cfg, "train").elements().as_numpy_iterator())
        rec_cfg = config_lib.DataConfig(data_dir=out, sup_size=4)
        records = list(sources.labeled_source(rec_cfg, "train").elements().as_numpy_iterator())
        self.assertLen(records, 4)
        for a, b in zip(folder, records):
            for key in a:
                self.assertAllEqual(a[key], b[key])

    def test_unsup_records(self):
        out = self._out()
        preprocess.run(_flags(output_base_dir=out, data_type="unsup", use_train_extra=True))
        sets = tfrecord.read_info(out)["sets"]
        self.assertEqual(sets["unsup"]["num_examples"], 7)
        self.assertEqual(sets["unsup_extra"]["num_examples"], 3)
        for r in _records(out, "unsup") + _records(out, "unsup_extra"):
            self.assertNotIn(tfrecord.LABEL_ENCODED, r)
            name = r[tfrecord.IMAGE_FILENAME].decode()
            if "/train_extra/" in name:
                extra_root = os.path.join(_ROOT, "cs", "leftImg8bit_trainextra")
                path = os.path.join(extra_root, name)
            else:
                path = os.path.join(_ROOT, "cs", name)
            self.assertEqual(r[tfrecord.IMAGE_ENCODED], _file_bytes(path))

    def test_offline_aug_copies_are_refused(self):
        with self.assertRaisesRegex(ValueError, "--aug_copy=2 .*online"):
            preprocess.run(_flags(output_base_dir=self._out(), aug_copy=2))

    def test_sup_size_too_large_writes_nothing(self):
        out = self._out()
        with self.assertRaisesRegex(ValueError, "--sup_size=8 is larger than the 7"):
            preprocess.run(_flags(output_base_dir=out, sup_size=8))
        self.assertEmpty(os.listdir(out))

    def test_custom_task_copies_its_declaration(self):
        root = self._out()
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, "images"))
            os.makedirs(os.path.join(root, split, "labels"))
            src = min(glob.glob(os.path.join(_ROOT, "cs", "leftImg8bit", split, "*", "*")))
            shutil.copy(src, os.path.join(root, split, "images", "a.png"))
            label = os.path.join(root, split, "labels", "a.png")
            tf.io.write_file(label, tf.io.encode_png(tf.zeros([32, 64, 1], tf.uint8) + 1))
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"class_names": ["bg", "fg"], "ignore_label": 255}, f)
        out = self._out()
        preprocess.run(_flags(output_base_dir=out, raw_data_dir=root, task_name="custom"))
        self.assertTrue(os.path.exists(os.path.join(out, "dataset.json")))
        cfg = config_lib.DataConfig(data_dir=out, task_name="custom", num_classes=2)
        element = next(iter(sources.labeled_source(cfg, "val").elements()))
        self.assertAllEqual(element["mask"], tf.ones([32, 64], tf.uint8))
        with self.assertRaisesRegex(ValueError, "holds task 'custom'"):
            sources.labeled_source(config_lib.DataConfig(data_dir=out), "val")

    @pytest.mark.slow  # A subprocess importing TensorFlow: ~8 s on 2 cores.
    def test_command_line(self):
        out = self._out()
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        result = subprocess.run(
            [sys.executable, "-m", "uda_tf.data.preprocess", f"--raw_data_dir={os.path.join(_ROOT, 'cs')}",
             f"--output_base_dir={out}", "--sup_size=2", "--task_name=cityscapes"],
            cwd=repo, capture_output=True, text=True, check=False,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertEqual(sorted(tfrecord.read_info(out)["sets"]), ["train-size_2", "val"])


if __name__ == "__main__":
    tf.test.main()
