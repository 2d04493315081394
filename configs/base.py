"""Base pretraining config: every field is declared here once, with its meaning.

Variants (`configs/cnn.py`, ...) import `get_config()` from here and change a few fields.
Override any field on the command line: `--config.batch_size=64 --config.model.emb_dim=128`.
"""

import ml_collections

import ecgcl_jax  # constants only: loading a config imports no JAX


def add_recipe_fields(section, learning_rate: float, weight_decay: float) -> None:
    """Declares a training recipe's fields in `section` (config.optim here, config.finetune in eval.py)."""
    # adam_l2 (L2 added to the gradient, then Adam) | adamw (decoupled decay) | lars (large batches)
    section.optimizer = "adam_l2"
    # constant | warmup_cosine (linear warmup, cosine decay) | warmup_constant (linear warmup, then constant)
    section.schedule = "constant"
    section.learning_rate = learning_rate  # the peak learning rate of a schedule
    # adam_l2: L2 coefficient added to the gradient (torch Adam's weight_decay); adamw: decoupled decay
    # (update -= lr * weight_decay * param); lars: L2 on kernels only
    section.weight_decay = weight_decay
    section.b1 = 0.9  # Adam / AdamW first-moment decay
    section.b2 = 0.999  # Adam / AdamW second-moment decay
    section.eps = 1e-8  # Adam / AdamW denominator epsilon
    section.warmup_steps = 0  # linear warmup from 0 over this many steps (warmup_* schedules)
    # warmup_cosine: total length including the warmup, after which the rate stays at its minimum;
    # 0 = the whole run (pretraining: num_steps; fine-tuning: every step of num_epochs)
    section.decay_steps = 0
    section.min_lr_ratio = 0.0  # warmup_cosine: final learning rate / learning_rate, in [0, 1]
    section.clip_norm = 0.0  # clip the gradient to this global L2 norm first; 0 = off
    section.momentum = 0.9  # lars: heavy-ball momentum
    section.trust_coefficient = 1e-3  # lars: trust ratio = coefficient * |param| / |update|


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order and augmentations
    c.num_steps = 300  # optimizer steps
    # global batch (all devices, all hosts); clamped to the dataset size with a warning
    c.batch_size = 128
    c.log_every = 10  # steps between metrics.jsonl lines / progress lines
    c.checkpoint_every = 100  # steps between checkpoints (the final step is always saved)
    c.keep_checkpoints = 3  # newest N checkpoints kept (the final one is always kept)
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and loss stay float32)
    c.temperature = 0.07  # NT-Xent temperature

    # Contrast mode: simclr (two views of the whole ECG) | cmsc | cmlc | cmsmlc (CLOCS family).
    c.mode = "simclr"
    # ECGs of the same patient in the global batch are positives of each other
    c.patient_positives = False
    # leads used by cmlc / cmsmlc (each a single-lead input); default II, V2, aVL, aVR (the constant is also
    # the leads of an exported encoder that does not record them)
    c.clocs_leads = ecgcl_jax.DEFAULT_CLOCS_LEADS

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # prepared dataset folder; "" = the embedded PTB-XL sample
    c.data.label = ""  # label column of the dataset ("" = its default); used by evaluation
    # "" = the single column config.data.label; else a task name or comma-separated columns
    c.data.task = ""
    c.data.domain = "time"  # time | frequency (|FFT|, first L/2 bins)
    # auto | yes | no: keep the whole int16 dataset on the device, or stream batches
    c.data.resident = "auto"
    c.data.prefetch = 2  # batches assembled ahead by the host thread when streaming
    # threads gathering a streamed batch; 0 = auto (1 on CPU, min(8, CPUs) otherwise)
    c.data.reader_threads = 0

    c.augment = ml_collections.ConfigDict()
    # Each view is a pipeline: step ('|' step)*, step = NAME[:PARAMS][@PROB] (PARAMS: comma-separated numbers,
    # a prefix of the op's parameters, the rest default; PROB in [0, 1]: per example, default 1), applied in order,
    # e.g. "baseline_wander:0.1@0.5|gaussian_noise:0.05|time_warp:4,0.2@0.3". NAME: gaussian_noise (factor),
    # dropout (rate), zero_mask (ratio), permute (m, shared), time_warp (m, warp), mix (rate, factor), none,
    # baseline_wander (amplitude, min_hz, max_hz, components), powerline (amplitude, harmonics),
    # muscle_noise (amplitude, low_hz, high_hz), amplitude_scale (low, high, per_lead),
    # random_resized_crop (min_frac, max_frac), lead_mask (k), vcg_rotate_scale (angle, max_scale; 12 leads).
    # See docs/pipelines.md.
    c.augment.view1 = "gaussian_noise:0.05"
    c.augment.view2 = "dropout:0.1"  # the same grammar
    # one permutation for all leads (keeps leads synchronous)
    c.augment.permute_shared_leads = False

    c.model = ml_collections.ConfigDict()
    # cnn | cnn_lstm | cnn_attn_lstm | cnn_transformer | res_cnn_lstm
    c.model.encoder = "cnn_attn_lstm"
    c.model.emb_dim = 256
    c.model.proj_dim = 128
    c.model.kernel_size = 15
    c.model.dropout = 0.3
    c.model.channels = (32, 32, 64, 64, 64)
    c.model.lstm_layers = 1
    c.model.attention_dim = 0  # additive attention width; 0 = emb_dim
    c.model.transformer_layers = 1
    c.model.transformer_heads = 2
    c.model.transformer_d_model = 64  # trunk channels are projected to this width when it differs

    # Training recipe (ecgcl_jax/optim.py; docs/recipes.md). Steps are optimizer steps.
    c.optim = ml_collections.ConfigDict()
    add_recipe_fields(c.optim, learning_rate=1e-5, weight_decay=1e-5)

    c.on_nonfinite = "stop"  # stop | skip: what a non-finite loss, gradient or update does
    # start from scratch when no checkpoint restores (else: error)
    c.restart_if_unrestorable = False
    c.lock()  # a typo in an override is an error, not a new field
    return c
