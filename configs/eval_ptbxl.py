"""PTB-XL benchmark: superdiagnostic (NORM, MI, STTC, CD, HYP) on the dataset's own folds, with baselines.

  python run_eval.py --config configs/eval_ptbxl.py --workdir runs/ptbxl
  python run_eval.py --config configs/eval_ptbxl.py --workdir runs/ptbxl_rhythm \
      --config.data.task=ptbxl_rhythm                                   # another task: one override
  python run_eval.py --config configs/eval_ptbxl.py --workdir runs/ptbxl_lf \
      --config.sweep.field=label_fraction --config.sweep.choices="(0.01,0.1,1.0)"   # label efficiency

Data: a PTB-XL folder prepared with `python -m ecgcl_jax.data prepare PTBXL_DIR --out DIR` (it writes the six
PTB-XL tasks and the strat_fold column), given with --config.data.path=DIR; "" is the embedded sample, enough
for a smoke run only. Split: strat_fold 1-8 train, 9 validation, 10 test (PTB-XL's recommendation), the same in
every repeat, so the K repeats differ in their training seed (initialisation, batch order, augmentations, the
label-fraction subset). Models are selected by validation macro-AUROC; the headline metric is test
macro-AUROC. The optional argument after ':' names the pretraining config, as in configs/eval.py.
"""

from configs import eval as eval_config


def get_config(pretrain_config: str = "cnn_attn_lstm"):
    c = eval_config.get_config(pretrain_config)
    c.data.task = "ptbxl_superdiagnostic"
    c.split.rule = "folds"  # eval.py's fold fields are PTB-XL's: strat_fold 1-8 / 9 / 10
    c.repeats = 5
    c.sweep.metric = "macro_auroc"  # what a label-fraction sweep plots
    return c
