"""Tests of the readers: folder, TFRecord, simple, CamVid, TFDS wiring, bad input."""

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data import cityscapes, fake_cityscapes, preprocess, sources, tfds_source
from uda_tf.data import decode as rd

CAMVID_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..", "shared", "data",
    "camvid_240x180",
)  # fmt: skip
_ROOT = None  # Set by setUpModule.
_TRAIN_NAMES = None


def setUpModule():
    global _ROOT, _TRAIN_NAMES
    _ROOT = tempfile.mkdtemp()
    fake_cityscapes.generate(
        os.path.join(_ROOT, "cs"), num_train=6, num_val=3, num_extra=4, height=64, width=128
    )
    cfg = _cfg(use_train_extra=True)
    records = os.path.join(_ROOT, "rec")
    preprocess.preprocess_sup(cfg, records, per_shard=4)
    preprocess.preprocess_unsup(cfg, records, per_shard=4)
    _TRAIN_NAMES = sorted(
        os.path.relpath(p, os.path.join(_ROOT, "cs"))
        for p in glob.glob(os.path.join(_ROOT, "cs", "leftImg8bit", "train", "*", "*.png"))
    )


def tearDownModule():
    shutil.rmtree(_ROOT, ignore_errors=True)


def _cfg(**kwargs) -> config_lib.DataConfig:
    kwargs.setdefault("data_dir", os.path.join(_ROOT, "cs"))
    return config_lib.DataConfig(**kwargs)


def _elements(source: sources.Source) -> dict:
    return {e[common.FILENAME].decode(): e for e in source.elements().as_numpy_iterator()}


def _label_of(image_path: str) -> str:
    path = image_path.replace("leftImg8bit", "gtFine", 1)
    return path.replace("_leftImg8bit.png", "_gtFine_labelIds.png")


def _image_of(label_path: str) -> str:
    path = label_path.replace("gtFine", "leftImg8bit", 1)
    return path.replace("_gtFine_labelIds.png", "_leftImg8bit.png")


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _digests(root: str) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `root`."""
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _corrupt_idat(path: str, fix_crc: bool) -> None:
    """Flips bytes in the middle of a PNG's first IDAT chunk; it still ends with IEND.

    With fix_crc the chunk's CRC is recomputed, so that only the zlib stream is
    broken (a CRC check alone would pass it).
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    middle = start + length // 2
    data[middle : middle + 8] = bytes(b ^ 0x5A for b in data[middle : middle + 8])
    if fix_crc:
        crc = zlib.crc32(bytes(data[start - 4 : start + length]))
        data[start + length : start + length + 4] = crc.to_bytes(4, "big")
    with open(path, "wb") as f:
        f.write(data)


class ReadersTest(tf.test.TestCase, parameterized.TestCase):
    def _copy_tree(self) -> str:
        path = os.path.join(tempfile.mkdtemp(), "cs")
        self.addCleanup(shutil.rmtree, os.path.dirname(path), ignore_errors=True)
        shutil.copytree(os.path.join(_ROOT, "cs"), path)
        return path

    def test_folder_reader_finds_exactly_the_files_and_reads_them(self):
        source = sources.labeled_source(_cfg(), "train")
        self.assertEqual(list(source.filenames), _TRAIN_NAMES)
        elements = _elements(source)
        self.assertEqual(sorted(elements), _TRAIN_NAMES)
        table = cityscapes.train_id_table()
        for name, e in elements.items():
            path = os.path.join(_ROOT, "cs", name)
            self.assertAllEqual(e[common.IMAGE], _read_png(path))
            self.assertEqual(e[common.MASK].dtype, np.uint8)
            self.assertAllEqual(e[common.MASK], table[_read_png(_label_of(path))])
        self.assertLen(sources.labeled_source(_cfg(), "val").filenames, 3)

    def test_unlabeled_pool(self):
        plain = sources.unlabeled_source(_cfg())
        self.assertEqual(sorted(plain.filenames), _TRAIN_NAMES)
        extra = sources.unlabeled_source(_cfg(use_train_extra=True))
        self.assertLen(extra.filenames, 10)
        self.assertLen([n for n in extra.filenames if "/train_extra/" in n], 4)
        element = next(iter(extra.elements()))
        self.assertCountEqual(element.keys(), [common.IMAGE, common.FILENAME])
        self.assertEqual(element[common.IMAGE].shape, (64, 128, 3))

    @parameterized.parameters("train", "val")
    def test_tfrecord_and_folder_readers_yield_identical_elements(self, split):
        folder = _elements(sources.labeled_source(_cfg(), split))
        records = _elements(
            sources.labeled_source(_cfg(data_dir=os.path.join(_ROOT, "rec")), split)
        )
        self.assertEqual(sorted(records), sorted(folder))
        for name in folder:
            for key in (common.IMAGE, common.MASK, common.FILENAME):
                self.assertAllEqual(records[name][key], folder[name][key])

    def test_tfrecord_unlabeled_equals_folder_unlabeled(self):
        folder = _elements(sources.unlabeled_source(_cfg(use_train_extra=True)))
        rec_cfg = _cfg(data_dir=os.path.join(_ROOT, "rec"), use_train_extra=True)
        records = _elements(sources.unlabeled_source(rec_cfg))
        self.assertEqual(sorted(records), sorted(folder))
        for name in folder:
            self.assertAllEqual(records[name][common.IMAGE], folder[name][common.IMAGE])
        plain = sources.unlabeled_source(dataclasses.replace(rec_cfg, use_train_extra=False))
        self.assertLen(plain.filenames, 6)

    @parameterized.parameters((2, 0, False), (4, 1, False), (3, 0, True))
    def test_every_reader_picks_the_same_labeled_subset(self, sup_size, seed, equal):
        cfg = _cfg(sup_size=sup_size, seed=seed, use_equal_split=equal)
        chosen = sources.select_labeled(_TRAIN_NAMES, sup_size, seed, equal)
        self.assertLen(chosen, sup_size)
        self.assertEqual(sources.labeled_filenames(cfg), chosen)
        # TFRecords holding train-full are filtered to the same subset.
        rec = dataclasses.replace(cfg, data_dir=os.path.join(_ROOT, "rec"))
        source = sources.labeled_source(rec, "train")
        self.assertEqual(sorted(source.filenames), chosen)
        self.assertEqual(sorted(_elements(source)), chosen)

    def test_select_labeled_properties(self):
        names = [
            f"leftImg8bit/train/c{i % 3}/c{i % 3}_{i:06d}_000019_leftImg8bit.png" for i in range(30)
        ]
        small = sources.select_labeled(names, 6, seed=0)
        large = sources.select_labeled(names, 12, seed=0)
        self.assertLen(set(small), 6)
        self.assertContainsSubset(small, large)  # Nested sizes.
        self.assertEqual(small, sources.select_labeled(list(reversed(names)), 6, seed=0))
        self.assertNotEqual(small, sources.select_labeled(names, 6, seed=1))
        self.assertEqual(sources.select_labeled(names, -1, seed=0), sorted(names))
        equal = sources.select_labeled(names, 6, seed=0, equal_split=True)
        cities = [n.split("/")[2] for n in equal]
        self.assertEqual(sorted(cities), ["c0", "c0", "c1", "c1", "c2", "c2"])
        dev = sources.select_dev(names, 5, seed=0)
        labeled = sources.select_labeled(names, -1, seed=0, dev_size=5)
        self.assertLen(dev, 5)
        self.assertLen(labeled, 25)
        self.assertEmpty(set(dev) & set(labeled))
        self.assertEqual(sources.select_labeled(names, 6, seed=0, dev_size=5), small)
        with self.assertRaisesRegex(ValueError, "--sup_size=31 is larger than the 30"):
            sources.select_labeled(names, 31, seed=0)

    def test_dev_split_is_read_from_train(self):
        cfg = _cfg(dev_size=2)
        dev = sources.labeled_source(cfg, "dev").filenames
        train = sources.labeled_source(cfg, "train").filenames
        self.assertLen(dev, 2)
        self.assertLen(train, 4)
        self.assertEqual(sorted(dev + train), _TRAIN_NAMES)

    def test_auto_detection(self):
        self.assertEqual(sources.resolve_data_source(_cfg()), "folder")
        self.assertEqual(
            sources.resolve_data_source(_cfg(data_dir=os.path.join(_ROOT, "rec"))), "tfrecord"
        )
        empty = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, empty)
        with self.assertRaisesRegex(ValueError, empty):
            sources.resolve_data_source(_cfg(data_dir=empty))
        with self.assertRaisesRegex(ValueError, "--data_source='zip'"):
            sources.resolve_data_source(_cfg(data_source="zip"))
        with self.assertRaisesRegex(ValueError, "does not fit --task_name=camvid"):
            sources.resolve_data_source(_cfg(data_source="folder", task_name="camvid"))

    def _simple_tree(self) -> str:
        """The fake train/val split in the simple layout, with trainId labels."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        table = cityscapes.train_id_table()
        for split in ("train", "val"):
            ids = []
            for path in sorted(
                glob.glob(os.path.join(_ROOT, "cs", "leftImg8bit", split, "*", "*"))
            ):
                i = os.path.basename(path).replace("_leftImg8bit.png", "")
                ids.append(i)
                os.makedirs(os.path.join(root, split, "images"), exist_ok=True)
                os.makedirs(os.path.join(root, split, "labels"), exist_ok=True)
                shutil.copy(path, os.path.join(root, split, "images", i + ".png"))
                label = table[_read_png(_label_of(path))]
                Image.fromarray(label).save(os.path.join(root, split, "labels", i + ".png"))
            with open(os.path.join(root, f"{split}.txt"), "w") as f:
                f.write("\n".join(ids) + "\n")
        os.makedirs(os.path.join(root, "unlabeled", "more"))
        for i, path in enumerate(
            glob.glob(
                os.path.join(_ROOT, "cs", "leftImg8bit_trainextra", "**", "*.png"), recursive=True
            )[:2]
        ):
            shutil.copy(path, os.path.join(root, "unlabeled", "more", f"u{i}.png"))
        decl = {"class_names": list(cityscapes.CLASS_NAMES), "ignore_label": 255}
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump(decl, f)
        return root

    def test_simple_layout(self):
        root = self._simple_tree()
        cfg = _cfg(data_dir=root, task_name="custom")
        self.assertEqual(sources.resolve_data_source(cfg), "simple")
        source = sources.labeled_source(cfg, "train")
        self.assertLen(source.filenames, 6)
        for name, e in _elements(source).items():
            self.assertTrue(name.startswith("train/images/"), name)
            stored = _read_png(os.path.join(root, name.replace("/images/", "/labels/")))
            self.assertAllEqual(e[common.MASK], stored)
        unlabeled = sources.unlabeled_source(cfg).filenames
        self.assertLen(unlabeled, 8)
        self.assertIn("unlabeled/more/u0.png", unlabeled)
        info = sources.dataset_info(cfg)
        self.assertEqual(info.class_names, cityscapes.CLASS_NAMES)
        self.assertEqual(info.palette, sources.default_palette(19))
        self.assertEqual(info.ignore_label, 255)

    def test_simple_layout_without_list_files(self):
        root = self._simple_tree()
        os.remove(os.path.join(root, "train.txt"))
        source = sources.labeled_source(_cfg(data_dir=root, task_name="custom"), "train")
        self.assertLen(source.filenames, 6)

    def test_declaration_errors(self):
        root = self._simple_tree()
        path = os.path.join(root, "dataset.json")
        cfg = _cfg(data_dir=root, task_name="custom", num_classes=19)
        for decl, message in (
            ({"class_names": ["a"]}, "class_names"),
            ({"class_names": ["a", "b"], "ignore_label": 1}, "ignore_label"),
            ({"class_names": ["a", "b"], "palette": [[0, 0, 0]]}, "palette"),
        ):
            with open(path, "w") as f:
                json.dump(decl, f)
            with self.assertRaisesRegex(ValueError, f"{path}.*{message}"):
                sources.dataset_info(cfg)
        with open(path, "w") as f:
            json.dump({"class_names": ["a", "b", "c"], "ignore_label": 9}, f)
        with self.assertRaisesRegex(ValueError, "--num_classes=19 but --task_name=custom has 3"):
            sources.check_num_classes(cfg)
        # Labels hold class ids 0..18 and 255: with 3 classes, 3..18 and 255 are errors.
        with self.assertRaisesRegex(
            ValueError, r"train/labels/.*label values \[.*\] are not allowed"
        ):
            sources.labeled_source(dataclasses.replace(cfg, num_classes=3), "train")
        os.remove(path)
        with self.assertRaisesRegex(ValueError, "dataset.json not found"):
            sources.dataset_info(cfg)

    def test_camvid(self):
        if not os.path.isdir(CAMVID_DIR):
            self.skipTest(f"{CAMVID_DIR} is absent.")
        cfg = _cfg(data_dir=CAMVID_DIR, task_name="camvid", num_classes=11)
        self.assertEqual(sources.resolve_data_source(cfg), "camvid")
        self.assertLen(sources.labeled_pairs(cfg, "train"), 367)
        val = sources.labeled_source(cfg, "val")  # Scans every val label's values.
        self.assertLen(val.filenames, 101)
        element = next(iter(val.elements()))
        self.assertEqual(element[common.IMAGE].shape, (180, 240, 3))
        self.assertContainsSubset(np.unique(element[common.MASK]), list(range(11)) + [255])
        info = sources.check_num_classes(cfg)
        self.assertEqual((info.num_classes, info.class_names[0]), (11, "sky"))

    def test_tfds_without_zips_names_the_directory_and_the_zips(self):
        # Only the wiring is tested here: tfds 4.9.10's cityscapes builder
        # requires 1024x2048 images at read time, so a small generated tree
        # cannot go through it (test_tfds_from_zips, marked slow, uses full size).
        empty = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, empty)
        cfg = _cfg(data_dir=empty, data_source="tfds")
        with self.assertRaisesRegex(ValueError, f"{empty}.*leftImg8bit_trainvaltest.zip.*gtFine"):
            sources.labeled_source(cfg, "train")
        with self.assertRaisesRegex(ValueError, "leftImg8bit_trainextra.zip"):
            tfds_source.builder(cfg, tfds_source.EXTRA)

    @pytest.mark.slow  # Full-size (1024x2048) images and a TFDS preparation: ~30 s.
    def test_tfds_from_zips(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        src, zips = os.path.join(root, "src"), os.path.join(root, "zips")
        fake_cityscapes.generate(src, num_train=3, num_val=1, num_extra=0, height=1024, width=2048)
        for kind, suffix in (
            ("leftImg8bit", "_leftImg8bit.png"),
            ("gtFine", "_gtFine_labelIds.png"),
        ):
            # The builder also reads a test split.
            os.makedirs(os.path.join(src, kind, "test", "berlin"))
            val = glob.glob(os.path.join(src, kind, "val", "*", "*" + suffix))[0]
            shutil.copy(
                val, os.path.join(src, kind, "test", "berlin", "berlin_000000_000019" + suffix)
            )
        os.makedirs(zips)
        for kind, name in zip(("leftImg8bit", "gtFine"), tfds_source.ZIPS[tfds_source.LABELED]):
            with zipfile.ZipFile(os.path.join(zips, name), "w", zipfile.ZIP_STORED) as z:
                for path in glob.glob(os.path.join(src, kind, "*", "*", "*")):
                    z.write(path, os.path.relpath(path, src))
        cfg = _cfg(data_dir=zips, sup_size=2)
        self.assertEqual(sources.resolve_data_source(cfg), "tfds")
        source = sources.labeled_source(cfg, "train")
        folder = _elements(sources.labeled_source(_cfg(data_dir=src, sup_size=2), "train"))
        self.assertEqual(sorted(source.filenames), sorted(folder))
        tfds_elements = _elements(source)
        self.assertEqual(sorted(tfds_elements), sorted(folder))
        for name, e in tfds_elements.items():
            self.assertAllEqual(e[common.IMAGE], folder[name][common.IMAGE])
            self.assertAllEqual(e[common.MASK], folder[name][common.MASK])
        self.assertEqual(sources.labeled_source(cfg, "val").num_examples, 1)

    # ------------------------------------------------------------ bad input

    def test_missing_root_and_split(self):
        with self.assertRaisesRegex(ValueError, "/no/such/dir"):
            sources.labeled_source(_cfg(data_dir="/no/such/dir"), "train")
        root = self._copy_tree()
        shutil.rmtree(os.path.join(root, "gtFine", "val"))
        with self.assertRaisesRegex(ValueError, os.path.join(root, "gtFine", "val")):
            sources.labeled_source(_cfg(data_dir=root), "val")

    def test_image_without_label_and_label_without_image(self):
        root = self._copy_tree()
        label = min(glob.glob(os.path.join(root, "gtFine", "train", "*", "*.png")))
        image = _image_of(label)
        os.rename(label, label + ".bak")
        with self.assertRaises(ValueError) as ctx:
            sources.labeled_source(_cfg(data_dir=root), "train")
        self.assertIn(image, str(ctx.exception))
        self.assertIn("have no *_gtFine_labelIds.png", str(ctx.exception))
        os.rename(label + ".bak", label)
        os.remove(image)
        with self.assertRaises(ValueError) as ctx:
            sources.labeled_source(_cfg(data_dir=root), "train")
        self.assertIn(label, str(ctx.exception))

    @parameterized.named_parameters(
        ("truncated_image", "image", "truncate", "truncated or corrupt PNG"),
        ("garbage_image", "image", "garbage", "not a readable PNG or JPEG"),
        ("truncated_label", "label", "truncate", "truncated or corrupt PNG"),
        ("rgb_label", "label", "rgb", "8-bit greyscale"),
        ("size_mismatch", "label", "resize", "label is 64x32 .* but its image .* is 128x64"),
    )
    def test_bad_files_are_named_before_training(self, which, damage, message):
        root = self._copy_tree()
        label = sorted(glob.glob(os.path.join(root, "gtFine", "train", "*", "*.png")))[1]
        image = _image_of(label)
        path = image if which == "image" else label
        with open(path, "rb") as f:
            data = f.read()
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "garbage":
            data = b"not an image at all" * 10
        if damage in ("truncate", "garbage"):
            with open(path, "wb") as f:
                f.write(data)
        elif damage == "rgb":
            Image.open(path).convert("RGB").save(path)
        else:
            Image.open(path).resize((64, 32), Image.NEAREST).save(path)
        with self.assertRaises(ValueError) as ctx:
            sources.labeled_source(_cfg(data_dir=root), "train")
        self.assertRegex(str(ctx.exception), message)
        self.assertIn(path, str(ctx.exception))

    def test_bad_label_value_names_the_file(self):
        # Up front (every label is decoded once), and on every decode for a
        # file that changes after the check.
        root = self._copy_tree()
        label = sorted(glob.glob(os.path.join(root, "gtFine", "train", "*", "*.png")))[2]
        good = _read_png(label).copy()
        values = good.copy()
        values[3, 4] = 40
        Image.fromarray(values).save(label)
        with self.assertRaisesRegex(ValueError, f"{label}: label values \\[40\\] are not allowed"):
            sources.labeled_source(_cfg(data_dir=root), "train")
        Image.fromarray(good).save(label)
        source = sources.labeled_source(_cfg(data_dir=root), "train")
        Image.fromarray(values).save(label)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, f"{label}.*label values.*40"):
            list(source.elements())

    @parameterized.named_parameters(
        ("image_crc", "image", False),
        ("image_zlib", "image", True),
        ("label_crc", "label", False),
        ("label_zlib", "label", True),
    )
    def test_corrupt_png_data_is_named_before_training(self, which, fix_crc):
        # Before: the header check passed it (intact IHDR and IEND) and the run
        # crashed at its first read with "Invalid PNG data, size N", no file named.
        root = self._copy_tree()
        label = sorted(glob.glob(os.path.join(root, "gtFine", "train", "*", "*.png")))[1]
        path = label if which == "label" else _image_of(label)
        _corrupt_idat(path, fix_crc)
        intact = _digests(root)
        with self.assertRaisesRegex(ValueError, f"{path}: corrupt PNG data: it does not decode"):
            sources.labeled_source(_cfg(data_dir=root), "train")
        self.assertEqual(_digests(root), intact)

    def test_corrupt_unlabeled_image_is_named_when_read(self):
        # The unlabeled pool (Cityscapes: 20,000 train_extra frames) is not
        # decoded up front: its first read names the file.
        root = self._copy_tree()
        extra = sorted(
            glob.glob(os.path.join(root, "leftImg8bit_trainextra", "**", "*.png"), recursive=True)
        )
        _corrupt_idat(extra[1], fix_crc=False)
        intact = _digests(root)
        source = sources.unlabeled_source(_cfg(data_dir=root, use_train_extra=True))
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, f"{extra[1]}: corrupt image data: it does not decode"
        ):
            list(source.elements())
        self.assertEqual(_digests(root), intact)

    def test_corrupt_bytes_in_the_graph_name_the_file(self):
        with open(os.path.join(_ROOT, "cs", _TRAIN_NAMES[0]), "rb") as f:
            data = f.read()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "some/file.png: truncated"):
            rd.decode_image(tf.constant(data[:-20]), tf.constant("some/file.png"))
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "label.png.*8-bit greyscale"):
            rd.decode_label(tf.constant(data), tf.constant("label.png"))  # An RGB PNG.

    def test_sup_size_too_large(self):
        with self.assertRaisesRegex(ValueError, "--sup_size=7 is larger than the 6 labeled"):
            sources.labeled_source(_cfg(sup_size=7), "train")

    def test_no_unlabeled_images(self):
        empty = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, empty)
        with self.assertRaisesRegex(ValueError, f"{empty} holds no .png"):
            sources.unlabeled_source(_cfg(unlabeled_dir=empty, unsup_ratio=1))
        records = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, records)
        preprocess.preprocess_sup(_cfg(), records)
        with self.assertRaisesRegex(ValueError, "No TFRecord set \\['unsup'\\]"):
            sources.unlabeled_source(_cfg(data_dir=records, unsup_ratio=1))
        root = self._copy_tree()
        shutil.rmtree(os.path.join(root, "leftImg8bit_trainextra"))
        with self.assertRaisesRegex(ValueError, "--use_train_extra"):
            sources.unlabeled_source(_cfg(data_dir=root, use_train_extra=True))


if __name__ == "__main__":
    tf.test.main()
