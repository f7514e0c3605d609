"""Every golden constant of the test suite, with its provenance.

Unless noted, values come from ../shared/SPEC.md §7 (computed there from the
definitions with the math module only) and ORIGINAL_UDA.md §3.7.
"""

# TSA threshold eta(t) = c(t) * (1 - 1/K) + 1/K. (schedule, t, K) -> eta.
TSA_THRESHOLDS = (
    ("linear_schedule", 0.1, 19, 0.147368),
    ("linear_schedule", 0.5, 19, 0.526316),
    ("exp_schedule", 0.5, 19, 0.130396),
    ("exp_schedule", 0.9, 19, 0.627240),
    ("log_schedule", 0.1, 19, 0.425392),
    ("log_schedule", 1.0, 19, 0.993617),
    ("log_schedule", 0.5, 10, 0.926124),
    # ORIGINAL_UDA.md §3.7 table, extra points.
    ("linear_schedule", 0.0, 19, 0.052632),
    ("exp_schedule", 0.0, 19, 0.059015),
    ("log_schedule", 0.0, 10, 0.100000),
)

# TSA masking, K = 3, linear schedule.
TSA_LOGITS = ((3.0, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 2.0, 0.0))
TSA_LABELS = (0, 0, 1)
TSA_P_CORRECT = (0.9094, 0.2741, 0.7870)  # 4 decimals in the SPEC.
TSA_CE = (0.094923, 1.294377, 0.239545)
TSA_KEPT_AT_HALF = (0.0, 1.0, 0.0)
TSA_LOSS_AT_HALF = 1.294377
TSA_LOSS_AT_ONE = 0.542948

# Consistency: ori [2, 1, 0], aug [1, 1.5, 0].
CONS_ORI = (2.0, 1.0, 0.0)
CONS_AUG = (1.0, 1.5, 0.0)
CONS_KL = ((-1.0, 0.239401), (0.4, 0.768114), (0.9, 0.280113))  # (T, KL)
CONS_TARGETS = (
    (-1.0, (0.665241, 0.244728, 0.090031)),
    (0.4, (0.918423, 0.075389, 0.006188)),
    (0.9, (0.695623, 0.228994, 0.075383)),
)
# Second pixel, confidence masking with T = 0.4 and thresh = 0.8.
CONS_ORI_B = (4.0, 1.0, 0.0)
CONS_AUG_B = (2.0, 2.0, 0.0)
CONS_KL_B = 0.753517
CONS_MASKED_LOSS = 0.376758  # mean over both pixels, the first masked out.
CONS_MASKED_LOSS_WRONG = 0.753517  # what normalising by sum(M) would give.
ENTROPY_ORI = 0.832396  # entropy of softmax([2, 1, 0]) in nats.

# Hard targets (FixMatch / UniMatch), ../shared/SPEC.md §8, on the two pixels
# above (ori CONS_ORI, aug CONS_AUG; ori CONS_ORI_B, aug CONS_AUG_B):
# L = sum(M * CE(argmax p_ori, softmax(z_aug))) / 2, M = [max p_ori > thresh].
# Rechecked by hand: CE = logsumexp(z_aug) - z_aug[0] = log(e + e^1.5 + 1) - 1
# and log(2 e^2 + 1) - 2; p_max = e^2 / (e^2 + e + 1), e^4 / (e^4 + e + 1).
HARD_P_MAX = (0.665241, 0.936240)
HARD_ARGMAX = (0, 0)
HARD_CE = (1.104131, 0.758624)
HARD_LOSSES = ((-1.0, 0.931377), (0.5, 0.931377), (0.8, 0.379312))  # (thresh, L)

# LR schedule: lr 0.03, 500k steps, no warmup. (step, lr).
LR_PEAK = 0.03
LR_TRAIN_STEPS = 500000
LR_VALUES = (
    (0, 0.030000),
    (125000, 0.028246),
    (250000, 0.023190),
    (375000, 0.015423),
    (500000, 0.005853),
)

# TSA masking at t = 0 (eta = 1/3): mask [0, 1, 0]. ORIGINAL_UDA.md §3.7.
TSA_LOSS_AT_ZERO = 1.294377

# Confusion matrix, K = 3, rows = ground truth, columns = prediction; computed
# by hand: IoU_c = TP / (row sum + column sum - TP) = 3/5, 2/3, 0/1.
IOU_CONFUSION = ((3, 1, 0), (0, 2, 0), (1, 0, 0))
IOU_PER_CLASS = (0.6, 2.0 / 3.0, 0.0)

# A default-flag UDA train step on a fixed tiny input, pinned so that new
# options cannot move the default path (tests/uda_model_test.py,
# PinnedDefaultsTest). Provenance: computed with the code at 42caf9c (before
# --uda_loss and --unsup_mix existed), CPU, TF 2.21: the logs of the second
# train_step of make_model(uda) on make_batch(), each name -> {log key: value}.
PINNED_STEP_LOGS = {
    # UdaConfig(unsup_ratio=1, num_classes=3, train_steps=4): every UDA default.
    "defaults": {
        "sup/loss": 1.1530733108520508,
        "unsup/loss": 0.0006297692307271063,
        "unsup/high_prob_ratio": 1.0,
        "total_loss": 1.1579031944274902,
        "lr": 0.09415441006422043,
    },
    # tests/uda_model_test.py UDA_ON: TSA, T = 0.5, thresh 0.36, entropy, coeff 2.
    "uda_on": {
        "sup/loss": 1.1662112474441528,
        "sup/trained_ratio": 0.9667119383811951,
        "unsup/loss": 0.02443576417863369,
        "unsup/high_prob_ratio": 0.8141427040100098,
        "unsup/ent_min_loss": 1.0673272609710693,
        "total_loss": 1.3259861469268799,
    },
    # UDA_ON without entropy, --uda_target=ema.
    "ema": {
        "sup/loss": 1.1654843091964722,
        "unsup/loss": 0.030706319957971573,
        "unsup/high_prob_ratio": 0.8460575938224792,
        "total_loss": 1.231065034866333,
    },
    # UDA_ON without entropy, --uda_target=inference, with batch norm.
    "inference_bn": {
        "sup/loss": 1.4819974899291992,
        "unsup/loss": 0.09656473249197006,
        "unsup/high_prob_ratio": 0.9837296605110168,
        "total_loss": 1.682749629020691,
    },
}

# SHA-256 of the first 2 batches of the local training stream (keys sorted,
# raw array bytes), tests/data/service_test.py: the tree of
# fake_cityscapes.generate(num_train=5, num_val=1, num_extra=2, 64x128), crops
# 48x80, batch 2, unsup_ratio 1, shuffle_buffer 8, seed 0, RandAugment replaced
# by the test's stand-in. Provenance: computed with the code at 29c5376,
# before the tf.data service option existed (CPU, TF 2.21).
LOCAL_STREAM_SHA256 = "9dd070af11da5022466bd738b97902db9e35d017ed08ccdceafb3b6e1dca0cbb"
