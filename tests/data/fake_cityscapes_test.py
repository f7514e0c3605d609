"""Tests of the synthetic Cityscapes-format tree generator."""

import glob
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from uda_tf.data import cityscapes, fake_cityscapes

_H, _W = 64, 128


def _tree_hash(root: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True)):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _label_path(image_path: str) -> str:
    path = image_path.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep, 1)
    return path.replace("_leftImg8bit.png", "_gtFine_labelIds.png")


class FakeCityscapesTest(tf.test.TestCase):
    def _new_dir(self) -> str:
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = os.path.join(tempfile.mkdtemp(), "fake_tree")
        cls.counts = fake_cityscapes.generate(
            cls.root, num_train=6, num_val=3, num_extra=4, height=_H, width=_W, seed=3
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(os.path.dirname(cls.root), ignore_errors=True)
        super().tearDownClass()

    def test_layout_is_the_official_one(self):
        name = re.compile(r"^([a-z\-]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")
        for split, n in (("train", 6), ("val", 3)):
            images = sorted(glob.glob(os.path.join(self.root, "leftImg8bit", split, "*", "*.png")))
            self.assertLen(images, n)
            for path in images:
                match = name.match(os.path.basename(path))
                self.assertIsNotNone(match, path)
                self.assertEqual(match.group(1), os.path.basename(os.path.dirname(path)))
                self.assertTrue(os.path.exists(_label_path(path)), path)
        extra = glob.glob(
            os.path.join(
                self.root, "leftImg8bit_trainextra", "leftImg8bit", "train_extra", "*", "*"
            )
        )
        self.assertLen(extra, 4)
        self.assertEmpty(glob.glob(os.path.join(self.root, "gtFine", "train_extra")))
        self.assertEqual(self.counts, {"train": 6, "val": 3, "train_extra": 4})

    def test_labels_are_label_ids_with_voids(self):
        all_values = set()
        for path in glob.glob(os.path.join(self.root, "gtFine", "*", "*", "*.png")):
            with Image.open(path) as im:
                self.assertEqual(im.mode, "L")
                self.assertEqual(im.size, (_W, _H))
                label = np.asarray(im)
            values = set(np.unique(label).tolist())
            self.assertTrue(all(v in cityscapes.LABEL_IDS for v in values), (path, values))
            # Ego vehicle at the bottom, sky at the top.
            self.assertEqual(np.bincount(label[-1]).argmax(), cityscapes.EGO_VEHICLE_ID)
            self.assertIn(23, label[0])
            all_values |= values
        self.assertIn(cityscapes.UNLABELED_ID, all_values)
        # The classes the scenes draw.
        for label_id in (7, 8, 11, 17, 21, 22, 23, 24, 26):
            self.assertIn(label_id, all_values)

    def test_colours_predict_classes(self):
        # A learnability proxy: class mean colours estimated on train classify
        # val pixels by nearest mean well above chance.
        def pixels(split):
            xs, ys = [], []
            for path in glob.glob(os.path.join(self.root, "leftImg8bit", split, "*", "*.png")):
                xs.append(np.asarray(Image.open(path), np.float32).reshape(-1, 3))
                ys.append(np.asarray(Image.open(_label_path(path))).reshape(-1))
            return np.concatenate(xs), np.concatenate(ys)

        x, y = pixels("train")
        classes = [c for c in np.unique(y) if (y == c).sum() > 50]
        means = np.stack([x[y == c].mean(0) for c in classes])
        xv, yv = pixels("val")
        keep = np.isin(yv, classes)
        pred = np.asarray(classes)[((xv[keep, None] - means[None]) ** 2).sum(-1).argmin(1)]
        self.assertGreater((pred == yv[keep]).mean(), 0.5)

    def test_same_seed_same_bytes_other_seed_differs(self):
        tmp = self._new_dir()
        args = {"num_train": 2, "num_val": 1, "num_extra": 1, "height": _H, "width": _W}
        fake_cityscapes.generate(os.path.join(tmp, "a"), seed=7, **args)
        fake_cityscapes.generate(os.path.join(tmp, "b"), seed=7, **args)
        fake_cityscapes.generate(os.path.join(tmp, "c"), seed=8, **args)
        self.assertEqual(_tree_hash(os.path.join(tmp, "a")), _tree_hash(os.path.join(tmp, "b")))
        self.assertNotEqual(_tree_hash(os.path.join(tmp, "a")), _tree_hash(os.path.join(tmp, "c")))

    def test_layouts_vary(self):
        images = sorted(glob.glob(os.path.join(self.root, "gtFine", "train", "*", "*.png")))
        labels = [np.asarray(Image.open(p)) for p in images]
        for a, b in itertools.pairwise(labels):
            self.assertGreater((a != b).mean(), 0.05)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "num_train"):
            fake_cityscapes.generate(self._new_dir(), num_train=-1)
        with self.assertRaisesRegex(ValueError, "16x16"):
            fake_cityscapes.generate(self._new_dir(), height=8)

    def test_command_line(self):
        out = self._new_dir()
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        subprocess.run(
            [sys.executable, "-m", "uda_tf.data.fake_cityscapes", f"--output_dir={out}",
             "--num_train=2", "--num_val=1", "--num_extra=1", "--height=32", "--width=64"],
            cwd=repo, check=True, capture_output=True,
        )  # fmt: skip
        images = glob.glob(os.path.join(out, "**", "*_leftImg8bit.png"), recursive=True)
        self.assertLen(images, 4)
        self.assertEqual(Image.open(images[0]).size, (64, 32))


if __name__ == "__main__":
    tf.test.main()
