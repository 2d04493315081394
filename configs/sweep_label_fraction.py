"""Label-fraction sweep: the evaluation protocol at several fractions of the training patients.

  python run_eval.py --config configs/sweep_label_fraction.py --workdir runs/sweep_lf

Writes WORKDIR/label_fraction=<f>/ (a full evaluation each: results.json, results.md, ...), and
WORKDIR/sweep.md, WORKDIR/sweep.csv, WORKDIR/sweep_auroc.png (test AUROC vs fraction, Student-t 95% bars).
Pretraining does not depend on the label fraction, so the variants share it (WORKDIR/pretrain/repeat_<seed>).
Resumable: re-running skips finished fractions and repeats. Override the fractions with
--config.sweep.choices="(0.05,0.2,1.0)".
"""

from configs import eval as eval_config


def get_config(pretrain_config: str = "cnn_attn_lstm"):
    c = eval_config.get_config(pretrain_config)
    c.sweep.field = "label_fraction"
    c.sweep.choices = (0.05, 0.1, 0.25, 0.5, 1.0)
    return c
