"""Evaluation protocol (run_eval.py): K repeats of split -> pretrain-or-load -> fine-tune -> select -> test.

  python run_eval.py --config configs/eval.py --workdir runs/eval [--config.repeats=5 ...]
  python run_eval.py --config configs/eval.py:clocs_cmsc --workdir runs/eval_cmsc   # another pretraining config

The optional argument after ':' names the nested pretraining config module in configs/ (default
cnn_attn_lstm); with a CLOCS contrast mode (cmsc, cmlc, cmsmlc), however it is set, the split defaults to
60/20/20 as in CLOCS.

The data section is shared: `config.data` IS `config.pretrain.data` (one ConfigDict under two names), so
`--config.data.path=DIR` / `--config.data.label=COLUMN` reach the nested pretraining as well (and
`--config.pretrain.data.path=DIR` sets the same field).
"""

import importlib

import ml_collections
from ml_collections import config_dict

from configs import base, cnn_attn_lstm


def get_config(pretrain_config: str = "cnn_attn_lstm") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    if pretrain_config in ("", "cnn_attn_lstm"):
        c.pretrain = cnn_attn_lstm.get_config()
    else:
        try:
            module = importlib.import_module(f"configs.{pretrain_config}")
        except ModuleNotFoundError:
            raise ValueError(
                f"configs/eval.py:{pretrain_config}: no pretraining config configs/{pretrain_config}.py"
            ) from None
        c.pretrain = module.get_config()
    # Pretraining per repeat uses every c.pretrain field; its seed is replaced by the repeat's seed.
    # shared: data.path ("" = embedded PTB-XL sample), data.label (label column)
    c.data = c.pretrain.data

    c.repeats = 3  # K: number of repeats (split + pretrain-or-load + fine-tune + test)
    # the reference's seeds; repeats beyond these draw further seeds deterministically
    c.seeds = (321, 123, 51)
    c.encoder_checkpoint = ""  # exported encoder (run_pretrain.py WORKDIR or WORKDIR/encoder); "" = pretrain per repeat
    # evaluate a loaded encoder even if it saw this repeat's val/test patients
    c.allow_leakage = False

    # Patient-level, stratified on the patient label (train/rest, then rest into val/test). Unset = chosen when the
    # run starts: 0.7/0.15/0.15, or 0.6/0.2/0.2 (the CLOCS paper's) when the pretraining mode, or a loaded encoder's,
    # is a CLOCS mode; so --config.pretrain.mode=cmsc gets the CLOCS split too.
    c.split = ml_collections.ConfigDict()
    c.split.train = config_dict.placeholder(float)
    c.split.val = config_dict.placeholder(float)  # one ECG per patient
    c.split.test = config_dict.placeholder(float)  # one ECG per patient
    # random: the patient-level stratified split above, one per seed (multi-label tasks: iterative stratification)
    # folds: the dataset's own folds (fixed; the repeats then vary only the training seed), e.g. PTB-XL's
    # strat_fold; val/test hold every labeled ECG of their folds; records without a fold are in no split (counted)
    c.split.rule = "random"
    c.split.fold_column = "strat_fold"  # meta.csv column of the folds (split.rule = folds)
    c.split.train_folds = (1, 2, 3, 4, 5, 6, 7, 8)  # PTB-XL's recommended training folds
    c.split.val_folds = (9,)
    c.split.test_folds = (10,)
    # fine-tune on this stratified fraction of the training patients (val/test unchanged)
    c.label_fraction = 1.0

    c.finetune = ml_collections.ConfigDict()
    c.finetune.num_epochs = 40  # validation scored every epoch; the best-AUROC epoch is kept
    c.finetune.batch_size = 64  # also the prediction batch (the last one padded and masked)
    # Fine-tuning recipe: the fields of config.pretrain.optim (configs/base.py, docs/recipes.md); steps are
    # optimizer steps over all epochs (epochs x batches per epoch).
    base.add_recipe_fields(c.finetune, learning_rate=1e-4, weight_decay=1e-4)
    c.finetune.head_dropout = 0.3  # Dense(emb) -> ReLU -> dropout -> Dense(1)
    # CLOCS encoders: concat | sum | mean | attention over halves/leads
    c.finetune.aggregate = "concat"

    # Baselines on the same splits (the main row is always the pretrained encoder fine-tuned end to end).
    c.baselines = ("linear_probe", "random_init", "random_init_linear_probe")

    # Percentile bootstrap over test patients of each repeat's test macro-AUROC, and of the paired differences
    # pretrained minus random init: resamples drawn with replacement (0 = no bootstrap intervals)
    c.bootstrap = ml_collections.ConfigDict()
    c.bootstrap.resamples = 1000

    c.sweep = ml_collections.ConfigDict()
    # dotted config field to sweep ("" = a single evaluation), e.g. "label_fraction"
    c.sweep.field = ""
    c.sweep.choices = ()  # its values; one results folder per value
    # metric of the sweep plot: auroc, auprc, f1, accuracy, precision, recall (one label), or macro_auroc,
    # micro_auroc, macro_auprc (any task)
    c.sweep.metric = "auroc"
    c.lock()
    return c
