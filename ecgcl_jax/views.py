"""Contrast modes and views: how a normalised ECG x (B, 5000, 12) becomes encoder input.

Contrast modes (``config.mode``) and the views they cut from x:
  simclr  the whole 10 s ECG.
  cmsc    CLOCS temporal: the two non-overlapping 5 s halves h1, h2 (B, 2500, 12).
  cmlc    CLOCS leads: each lead of ``clocs_leads`` as a single-lead input (B, 5000, 1).
  cmsmlc  both: each lead of ``clocs_leads`` in each half (B, 2500, 1).

View order, everywhere (pretraining, fine-tuning, embedding): halves first (h1, then h2), and within each half
the leads in ``clocs_leads`` order. In the frequency domain each view is replaced by its |FFT| (first L/2 bins:
(B, L/2, C)).

Pretraining (``augmented_views``, a list of V views of one step; view1/view2 = ``config.augment.view1/2``):
  simclr  [view1(x), view2(x)]                                  V = 2, each (B, 5000, 12)
  cmsc    [view1(h1), view2(h1), view1(h2), view2(h2)]          V = 4, each (B, 2500, 12)
  cmlc    [view1(x[..., l]) for l in clocs_leads]               V = len(clocs_leads), each (B, 5000, 1)
  cmsmlc  [view1(h1[..., l]) for l] + [view2(h2[..., l]) for l]  V = 2 len(clocs_leads), each (B, 2500, 1)
Augmentation keys: example i (its index in the global batch) of a pair of views gets the keys
split(fold_in(k, i)) (``augment.two_views``), with k = key (the step's augmentation key) for simclr,
fold_in(key, h) for half h = 1, 2 of cmsc, and fold_in(key, 100 h + j) for lead column j (its index in
``ecgcl_jax.LEADS``) of half h (h = 1 when the mode has no halves) of cmlc/cmsmlc.

Classifier and embedding input (``input_views``, no augmentation, described by a ``ViewSpec``): simclr gives
x itself (B, 5000, 12); every other mode stacks its views on axis 1, (B, V, L', C'): cmsc V = 2 (h1, h2),
cmlc V = len(clocs_leads), cmsmlc V = 2 len(clocs_leads).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ecgcl_jax import DEFAULT_CLOCS_LEADS, LEADS, NUM_SAMPLES, augment

CONTRAST_MODES = ("simclr", "cmsc", "cmlc", "cmsmlc")
HALF_MODES = ("cmsc", "cmsmlc")  # views cut from the two 5 s halves
LEAD_MODES = ("cmlc", "cmsmlc")  # one single-lead view per clocs lead


def segments(x, mode: str) -> list:
    """x: (B, L, C) -> what a contrast mode cuts its views from: the two non-overlapping halves (B, L//2, C) for
    cmsc/cmsmlc, else [x] (simclr, cmlc)."""
    if mode in HALF_MODES:
        half = x.shape[1] // 2
        return [x[:, :half], x[:, half : 2 * half]]
    return [x]


def lead_indices(leads) -> list[int]:
    """Lead names (e.g. config.clocs_leads) -> columns in the standard order ecgcl_jax.LEADS."""
    return [LEADS.index(l) for l in leads]


# ------------------------------------------------------------------------------------ classifier input
@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How a normalised ECG becomes encoder input outside pretraining; must match the encoder's pretraining.

    mode: simclr | cmsc | cmlc | cmsmlc; domain: time | frequency; clocs_leads: leads of cmlc/cmsmlc
    (config.mode, config.data.domain, config.clocs_leads: their defaults are declared in configs/base.py).
    """

    mode: str
    domain: str
    clocs_leads: tuple

    @property
    def num_views(self) -> int:
        """V of ``input_views``: halves × leads (1 for simclr)."""
        halves = 2 if self.mode in HALF_MODES else 1
        leads = len(self.clocs_leads) if self.mode in LEAD_MODES else 1
        return halves * leads

    @property
    def multi_view(self) -> bool:
        """Whether ``input_views`` stacks views on axis 1 (every mode but simclr)."""
        return self.mode != "simclr"

    @classmethod
    def from_pretrain_config(cls, config) -> ViewSpec:
        return cls(
            mode=str(config.mode),
            domain=str(config.data.domain),
            clocs_leads=tuple(config.clocs_leads),
        )

    @classmethod
    def from_preprocessing(cls, prep: dict) -> ViewSpec:
        """From an exported encoder's `preprocessing` dict. A field it does not record is read as what such an
        encoder was pretrained with: simclr, time, DEFAULT_CLOCS_LEADS."""
        return cls(
            mode=str(prep.get("mode", "simclr")),
            domain=str(prep.get("domain", "time")),
            clocs_leads=tuple(prep.get("clocs_leads", DEFAULT_CLOCS_LEADS)),
        )


def input_views(x: jax.Array, spec: ViewSpec) -> jax.Array:
    """x: (B, 5000, 12) normalised -> (B, L', C') for simclr, else (B, V, L', C') (see the module docstring).

    Views are ordered as in pretraining: halves (first, second), and within each half the `clocs_leads`.
    """
    views = segments(x, spec.mode)
    if spec.mode in LEAD_MODES:
        views = [seg[:, :, j : j + 1] for seg in views for j in lead_indices(spec.clocs_leads)]
    if spec.domain == "frequency":
        views = [augment.fft_magnitude(v) for v in views]
    return views[0] if not spec.multi_view else jnp.stack(views, axis=1)


# ----------------------------------------------------------------------------------------- pretraining
def input_geometry(config) -> tuple[int, int, int]:
    """(length seen by the augmentations, encoder input length, encoder input leads) for the pretraining
    config's mode and domain: e.g. cmsmlc in the frequency domain -> (2500, 1250, 1)."""
    length = NUM_SAMPLES // (2 if config.mode in HALF_MODES else 1)
    in_leads = 1 if config.mode in LEAD_MODES else len(LEADS)
    enc_len = length // 2 if config.data.domain == "frequency" else length
    return length, enc_len, in_leads


def view_pipeline(
    config, field: str, length: int | None = None, name: str = "config"
) -> augment.Pipeline:
    """The validated pipeline of ``config.augment.<field>`` (view1 | view2) for this mode's views; errors
    name it ``<name>.augment.<field>`` (name: the config's dotted name, e.g. "config.pretrain").

    Parsed once (``augment.parse`` caches it) for the lead count the views have and ``length`` samples
    (default: the mode's, from ``input_geometry``).
    """
    mode_length, _, leads = input_geometry(config)
    length = mode_length if length is None else length
    return augment.parse(
        config.augment[field],
        length,
        leads,
        field=f"{name}.augment.{field}",
        permute_shared=bool(config.augment.permute_shared_leads),
    )


def pipeline_records(config) -> dict:
    """{'view1': ..., 'view2': ...}: each view's parsed pipeline as config.json / encoder.json record it."""
    return {f: augment.pipeline_record(view_pipeline(config, f)) for f in ("view1", "view2")}


def augmented_views(config, key: jax.Array, x: jax.Array) -> list[jax.Array]:
    """x: (B, 5000, 12) normalised, key: the step's augmentation key -> the V augmented encoder inputs of a
    pretraining step, each (B, L', C'), in the order and with the keys of the module docstring."""
    segs = segments(x, config.mode)
    length = segs[0].shape[1]
    aug1, aug2 = view_pipeline(config, "view1", length), view_pipeline(config, "view2", length)
    gidx = jnp.arange(x.shape[0], dtype=jnp.int32)  # position in the *global* batch

    def pair(k, xs, a1, a2):
        return augment.two_views(k, xs, gidx, a1, a2)

    if config.mode == "simclr":
        views = list(pair(key, x, aug1, aug2))
    elif config.mode == "cmsc":
        h1v1, h1v2 = pair(jax.random.fold_in(key, 1), segs[0], aug1, aug2)
        h2v1, h2v2 = pair(jax.random.fold_in(key, 2), segs[1], aug1, aug2)
        views = [h1v1, h1v2, h2v1, h2v2]
    else:  # cmlc: each lead of x under view1; cmsmlc: each lead of half 1 under view1, of half 2 under view2
        views = []
        for s, seg in enumerate(segs):
            for j in lead_indices(config.clocs_leads):
                v, _ = pair(
                    jax.random.fold_in(key, 100 * (s + 1) + j),
                    seg[:, :, j : j + 1],
                    (aug1, aug2)[s],
                    augment.IDENTITY,
                )
                views.append(v)
    if config.data.domain == "frequency":
        views = [augment.fft_magnitude(v) for v in views]
    return views
