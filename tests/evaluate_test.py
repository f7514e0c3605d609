"""Tests of uda_tf/evaluate.py, cross-checked with cityscapesscripts."""

import glob
import os
import shutil
import tempfile
import types

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from absl.testing import parameterized
from PIL import Image

from flags import uda_flags
from uda_tf import callbacks, common, evaluate, main
from uda_tf import config as config_lib
from uda_tf.data import base, cityscapes, fake_cityscapes, sources, streams

NUM_CLASSES = cityscapes.NUM_CLASSES


def _random_network(seed: int) -> keras.Model:
    """A fixed random convolution: predictions that vary with the pixels."""
    return keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Rescaling(1 / 64.0, offset=-2.0),
            keras.layers.Conv2D(
                NUM_CLASSES,
                3,
                padding="same",
                kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed),
                bias_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed + 1),
            ),
        ]
    )


def _cityscapes_scores(pred_files: list[str], gt_files: list[str]) -> dict:
    """cityscapesscripts' pixel-level evaluation of labelId PNGs."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    args = cs_eval.args
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    # numpy >= 2.4 dropped np.in1d, which cityscapesscripts still calls.
    shim = not hasattr(np, "in1d")
    if shim:
        np.in1d = np.isin
    try:
        return cs_eval.evaluateImgLists(pred_files, gt_files, args)
    finally:
        if shim:
            del np.in1d


class CityscapesScriptsTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        fake_cityscapes.generate(
            cls.tmp, num_train=1, num_val=5, num_extra=0, height=64, width=128, seed=3
        )
        cls.data_cfg = config_lib.DataConfig(data_dir=cls.tmp, eval_batch_size=2)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_per_class_iou_equals_cityscapesscripts(self):
        network = _random_network(seed=7)
        dataset = streams.eval_dataset(self.data_cfg, split="val")
        confusion = evaluate.confusion_matrix(
            network, dataset, num_classes=NUM_CLASSES, ignore_label=255
        )
        results = evaluate.results_from_confusion(confusion, cityscapes.CLASS_NAMES)

        # The same predictions as labelId PNGs, for cityscapesscripts.
        to_label_id = np.zeros([256], np.uint8)
        for train_id, label_id in cityscapes.TRAIN_ID_TO_LABEL_ID.items():
            to_label_id[train_id] = label_id
        predict = evaluate.predict_fn(network)
        gt_by_id = {
            base.example_id(f): f
            for f in glob.glob(os.path.join(self.tmp, "gtFine", "val", "*", "*_labelIds.png"))
        }
        pred_files, gt_files = [], []
        for batch in dataset:
            predictions = predict(batch[common.IMAGE]).numpy()
            for name, prediction in zip(batch[common.FILENAME].numpy(), predictions):
                example = base.example_id(name.decode())
                path = os.path.join(self.tmp, f"{example}_pred.png")
                Image.fromarray(to_label_id[prediction]).save(path)
                pred_files.append(path)
                gt_files.append(gt_by_id[example])
        self.assertLen(pred_files, 5)
        reference = _cityscapes_scores(pred_files, gt_files)

        num_present = 0
        for train_id, name in enumerate(cityscapes.CLASS_NAMES):
            expected = reference["classScores"][
                cityscapes_label_name(cityscapes.TRAIN_ID_TO_LABEL_ID[train_id])
            ]
            ours = results[f"iou/{name}"]
            if np.isnan(expected):
                self.assertTrue(np.isnan(ours), name)
            else:
                num_present += 1
                self.assertAllClose(ours, expected, atol=1e-6, msg=name)
        self.assertGreater(num_present, 5)
        self.assertAllClose(results["mean_iou"], reference["averageScoreClasses"], atol=1e-6)


def cityscapes_label_name(label_id: int) -> str:
    from cityscapesscripts.helpers.labels import id2label

    return id2label[label_id].name


class ResultsTest(tf.test.TestCase, parameterized.TestCase):
    # Rows: ground truth, columns: prediction. Class 2 never appears.
    CONFUSION = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]], np.float64)

    def test_results_from_confusion(self):
        results = evaluate.results_from_confusion(self.CONFUSION, ("a", "b", "c"))
        self.assertAllClose(results["iou/a"], 3 / 6)  # TP 3, FP 2, FN 1.
        self.assertAllClose(results["iou/b"], 4 / 7)  # TP 4, FP 1, FN 2.
        self.assertTrue(np.isnan(results["iou/c"]))
        self.assertAllClose(results["mean_iou"], (3 / 6 + 4 / 7) / 2)
        self.assertAllClose(results["pixel_accuracy"], 7 / 10)

    def test_class_names_must_match(self):
        with self.assertRaisesRegex(ValueError, "2 class names for 3 classes"):
            evaluate.results_from_confusion(self.CONFUSION, ("a", "b"))

    def test_results_file_round_trip(self):
        results = evaluate.results_from_confusion(self.CONFUSION, ("a", "b", "c"))
        path = os.path.join(tempfile.mkdtemp(), "results.txt")
        evaluate.write_results(path, results, global_step=12)
        parsed = evaluate.parse_results(path)
        self.assertEqual(parsed.pop("global_step"), 12)
        self.assertEqual(list(parsed), list(results))
        for key, value in results.items():
            self.assertAllClose(parsed[key], value, atol=1e-6)

    def test_table_names_every_class(self):
        results = evaluate.results_from_confusion(self.CONFUSION, ("a", "b", "c"))
        table = evaluate.format_table(results, ("a", "b", "c"))
        self.assertRegex(table, r"(?m)^a +50\.00$")
        self.assertRegex(table, r"(?m)^c +nan$")
        self.assertRegex(table.splitlines()[-1], r"^mean IoU +53\.57$")

    def test_colorize_uses_the_palette_and_blacks_out_ignore(self):
        palette = ((10, 20, 30), (40, 50, 60))
        colours = evaluate.colorize(np.array([[0, 1, 255]]), palette)
        self.assertAllEqual(colours, [[[10, 20, 30], [40, 50, 60], [0, 0, 0]]])

    def test_write_predictions_round_trips_class_ids(self):
        network = _random_network(seed=1)
        images = np.random.default_rng(0).integers(0, 256, [3, 8, 16, 3], dtype=np.uint8)
        masks = np.full([3, 8, 16], 255, np.uint8)
        dataset = tf.data.Dataset.from_tensor_slices(
            {
                common.IMAGE: images,
                common.MASK: masks,
                common.FILENAME: ["x/a_leftImg8bit.png", "x/b_leftImg8bit.png", "x/c.png"],
            }
        ).batch(2)
        out = tempfile.mkdtemp()
        palette = cityscapes.PALETTE
        paths = evaluate.write_predictions(network, dataset, out, palette=palette, num_images=2)
        self.assertEqual(
            sorted(os.path.basename(p) for p in paths),
            ["a_panel.png", "a_pred.png", "b_panel.png", "b_pred.png"],
        )
        expected = evaluate.predict_fn(network)(images).numpy()
        pred = Image.open(os.path.join(out, "a_pred.png"))
        self.assertEqual(pred.mode, "P")
        self.assertAllEqual(np.array(pred), expected[0])
        panel = np.array(Image.open(os.path.join(out, "b_panel.png")))
        self.assertAllEqual(panel[:, :16], images[1])
        self.assertAllEqual(panel[:, 16:32], evaluate.colorize(expected[1], palette))
        self.assertAllEqual(panel[:, 32:], np.zeros([8, 16, 3]))


# A CamVid-like folder: 180x240 frames whose classes 0..2 are stripes 6 pixels
# wide (class c: pure colour channel c; stored value 11, the ignore, black).
STORED_HEIGHT, STORED_WIDTH = 180, 240
NUM_CAMVID_CLASSES = 11


def _stripe_labels(rng, vertical: bool) -> np.ndarray:
    """uint8 [180, 240]: a class (0, 1, 2 or the ignore value 11) per stripe."""
    length = STORED_WIDTH if vertical else STORED_HEIGHT
    stripes = rng.choice([0, 1, 2, 11], size=length // 6, p=[0.3, 0.3, 0.3, 0.1])
    line = np.repeat(stripes, 6).astype(np.uint8)
    if vertical:
        return np.broadcast_to(line[None, :], (STORED_HEIGHT, STORED_WIDTH)).copy()
    return np.broadcast_to(line[:, None], (STORED_HEIGHT, STORED_WIDTH)).copy()


def _write_camvid_like(root: str, num_val: int = 3) -> np.ndarray:
    """val/images/*.png, val/labels/*.png; returns the stored labels [n, 180, 240]."""
    rng = np.random.default_rng(5)
    os.makedirs(os.path.join(root, "val", "images"))
    os.makedirs(os.path.join(root, "val", "labels"))
    all_labels = []
    for i in range(num_val):
        labels = _stripe_labels(rng, vertical=i % 2 == 0)
        image = np.zeros([STORED_HEIGHT, STORED_WIDTH, 3], np.uint8)
        for c in range(3):
            image[..., c] = np.where(labels == c, 255, 0)
        Image.fromarray(image).save(os.path.join(root, "val", "images", f"f{i}.png"))
        Image.fromarray(labels).save(os.path.join(root, "val", "labels", f"f{i}.png"))
        all_labels.append(labels)
    return np.stack(all_labels)


def _colour_network() -> keras.Model:
    """Logits = the pixel's colour for classes 0..2, -1 for the other 8: at half
    size, where a 6-pixel stripe is 3 pixels, it still predicts every stripe."""
    kernel = np.zeros([1, 1, 3, NUM_CAMVID_CLASSES], np.float32)
    kernel[0, 0, [0, 1, 2], [0, 1, 2]] = 1.0
    bias = np.full([NUM_CAMVID_CLASSES], -1.0, np.float32)
    bias[:3] = 0.0
    conv = keras.layers.Conv2D(NUM_CAMVID_CLASSES, 1)
    network = keras.Sequential([keras.Input((None, None, 3)), conv])
    conv.set_weights([kernel, bias])
    return network


def _camvid_config(data_dir: str, model_dir: str, *extra: str) -> config_lib.Config:
    flag_values = flags.FlagValues()
    uda_flags.define_flags(flag_values)
    flag_values(
        [
            "uda_tf.main",
            "--task_name=camvid",
            "--data_source=camvid",
            f"--data_dir={data_dir}",
            f"--model_dir={model_dir}",
            "--resize_factor=0.5",
            "--eval_batch_size=2",
            "--num_vis_images=2",
            "--do_train=false",
            "--do_eval",
            *extra,
        ]
    )
    return uda_flags.config_from_flags(flag_values)


class StoredSizeTest(tf.test.TestCase):
    """--resize_factor=0.5: the network sees 90x120 frames, the score counts 180x240 labels."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        cls.data_dir = os.path.join(cls.root, "camvid")
        cls.labels = _write_camvid_like(cls.data_dir)
        cls.network = _colour_network()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_eval_batches_hold_the_stored_labels_and_the_smaller_input(self):
        cfg = _camvid_config(self.data_dir, os.path.join(self.root, "unused"))
        batch = next(iter(callbacks.eval_input(cfg)))
        self.assertEqual(batch[common.IMAGE].shape, (2, 90, 120, 3))
        self.assertEqual(batch[common.MASK].shape, (2, 180, 240))
        self.assertEqual(batch[common.STORED_IMAGE].shape, (2, 180, 240, 3))
        stored = np.where(self.labels[:2] == 11, 255, self.labels[:2])
        self.assertAllEqual(batch[common.MASK], stored)

    def test_results_are_computed_on_the_stored_labels(self):
        model_dir = os.path.join(self.root, "run")
        os.makedirs(model_dir)  # as main.run makes it
        cfg = _camvid_config(self.data_dir, model_dir)
        info = sources.dataset_info(cfg.data)
        results = main.final_evaluation(cfg, self.network, info, step=7, chief=True)
        confusion = evaluate.confusion_matrix(
            self.network, callbacks.eval_input(cfg), num_classes=11, ignore_label=255
        )
        # Every stored pixel whose label is not the ignore value, none of 90x120.
        self.assertEqual(np.sum(confusion), np.sum(self.labels != 11))
        written = evaluate.parse_results(os.path.join(model_dir, "results.txt"))
        self.assertEqual(written["global_step"], 7)
        # Perfect at half size (3-pixel stripes), and still after the logits
        # are resized bilinearly to 180x240: stripe edges fall on even pixels.
        self.assertAllClose(written["mean_iou"], 1.0, atol=1e-6)
        self.assertAllClose(written["pixel_accuracy"], 1.0, atol=1e-6)
        self.assertAllClose(results["mean_iou"], 1.0, atol=1e-6)
        prediction = np.array(Image.open(os.path.join(model_dir, "predictions", "f0_pred.png")))
        self.assertEqual(prediction.shape, (STORED_HEIGHT, STORED_WIDTH))
        valid = self.labels[0] != 11
        self.assertAllEqual(prediction[valid], self.labels[0][valid])
        panel = np.array(Image.open(os.path.join(model_dir, "predictions", "f1_panel.png")))
        self.assertEqual(panel.shape, (STORED_HEIGHT, 3 * STORED_WIDTH, 3))

    def test_the_old_behaviour_scores_resized_masks(self):
        cfg = _camvid_config(
            self.data_dir, os.path.join(self.root, "old"), "--eval_at_stored_size=false"
        )
        batch = next(iter(callbacks.eval_input(cfg)))
        self.assertNotIn(common.STORED_IMAGE, batch)
        self.assertEqual(batch[common.MASK].shape, (2, 90, 120))
        confusion = evaluate.confusion_matrix(
            self.network, callbacks.eval_input(cfg), num_classes=11, ignore_label=255
        )
        halved = self.labels[:, ::2, ::2]  # 6-pixel stripes: nearest keeps every stripe.
        self.assertEqual(np.sum(confusion), np.sum(halved != 11))

    def test_dev_pictures_are_at_the_stored_size(self):
        cfg = _camvid_config(self.data_dir, os.path.join(self.root, "vis"))
        vis_batch = next(iter(callbacks.eval_input(cfg, 2, batch_size=2)))
        writer = tf.summary.create_file_writer(os.path.join(self.root, "vis", "eval"))
        callback = callbacks.EvalSummaries(
            cfg,
            writer,
            info=sources.dataset_info(cfg.data),
            vis_batch=vis_batch,
            dev_dataset=None,
        )
        iterations = tf.Variable(3, dtype=tf.int64)
        callback.set_model(
            types.SimpleNamespace(
                ema_network=self.network, optimizer=types.SimpleNamespace(iterations=iterations)
            )
        )
        callback.on_epoch_end(0)  # input | prediction | truth, each 180x240
        writer.flush()
        events = glob.glob(os.path.join(self.root, "vis", "eval", "events.out.tfevents.*"))
        self.assertLen(events, 1)


if __name__ == "__main__":
    tf.test.main()
