"""A SimCLR pretraining recipe to start from: composed augmentation pipelines per view and AdamW with a
linear warmup then a cosine decay. See configs/base.py for every field and docs/recipes.md for the recipe.

  python run_pretrain.py --config configs/simclr_recipe.py --workdir runs/recipe
"""

from configs import base


def get_config():
    c = base.get_config()
    # each view: ops applied in order, NAME[:PARAMS][@PROB] with PROB the per-example probability
    c.augment.view1 = "random_resized_crop@0.5|baseline_wander@0.5|gaussian_noise:0.05"
    c.augment.view2 = "amplitude_scale@0.5|powerline@0.3|dropout:0.1"
    c.num_steps = 1000
    c.optim.optimizer = "adamw"
    c.optim.schedule = "warmup_cosine"
    c.optim.learning_rate = 1e-3  # peak, reached after the warmup
    c.optim.weight_decay = 1e-4  # decoupled: each step shrinks the weights by lr * 1e-4
    c.optim.warmup_steps = 100  # 10% of num_steps
    c.optim.min_lr_ratio = 0.01  # the cosine ends at 1e-5 at num_steps (decay_steps 0 = num_steps)
    c.optim.clip_norm = 1.0  # a guard against rare gradient spikes early in training
    c.lock()
    return c
