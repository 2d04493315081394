"""Views: the contrast modes' geometry, the classifier/embedding views and the augmented views of a
pretraining step (order, slices, augmentations, keys)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ecgcl_jax
from configs import base
from ecgcl_jax import augment, views
from ecgcl_jax.augment import Op
from tests.conftest import override, view_spec


def view_config(**over):
    return override(base.get_config(), **over)


def test_input_views_by_mode():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5000, 12)), jnp.float32)
    leads = ("II", "V2", "aVL", "aVR")
    idx = [ecgcl_jax.LEADS.index(l) for l in leads]
    np.testing.assert_array_equal(views.input_views(x, view_spec(mode="simclr")), x)
    v = views.input_views(x, view_spec(mode="cmsc"))
    assert v.shape == (3, 2, 2500, 12)
    np.testing.assert_array_equal(v[:, 1], x[:, 2500:])
    v = views.input_views(x, view_spec(mode="cmlc", clocs_leads=leads))
    assert v.shape == (3, 4, 5000, 1)
    np.testing.assert_array_equal(v[:, 2, :, 0], x[:, :, idx[2]])
    v = views.input_views(x, view_spec(mode="cmsmlc", clocs_leads=leads))
    assert v.shape == (3, 8, 2500, 1)
    np.testing.assert_array_equal(v[:, 5, :, 0], x[:, 2500:, idx[1]])  # second half, second lead
    v = views.input_views(x, view_spec(mode="cmsc", domain="frequency"))
    assert v.shape == (3, 2, 1250, 12)
    want = np.abs(np.fft.rfft(np.asarray(x[:, :2500], np.float64), axis=1))[:, :1250]
    np.testing.assert_allclose(v[:, 0], want, rtol=1e-4, atol=1e-3)
    assert view_spec(mode="cmsmlc", clocs_leads=leads).num_views == 8


def test_view_spec_from_config_and_from_an_encoder_record():
    """The spec of a pretraining config and of the encoder it exports agree; an encoder record without
    clocs_leads falls back to the config's default leads."""
    c = view_config(mode="cmlc", **{"data.domain": "frequency", "clocs_leads": ("I", "V6")})
    spec = views.ViewSpec.from_pretrain_config(c)
    assert spec == views.ViewSpec("cmlc", "frequency", ("I", "V6"))
    prep = {"mode": "cmlc", "domain": "frequency", "clocs_leads": ["I", "V6"]}
    assert views.ViewSpec.from_preprocessing(prep) == spec
    old = views.ViewSpec.from_preprocessing({"mode": "cmsmlc"})
    assert old.clocs_leads == tuple(base.get_config().clocs_leads) and old.domain == "time"
    assert views.ViewSpec.from_preprocessing({}) == views.ViewSpec(
        "simclr", "time", views.DEFAULT_CLOCS_LEADS
    )
    # what encoders exported without a leads record were pretrained with, written out: not a default to change
    assert old.clocs_leads == ("II", "V2", "aVL", "aVR")


@pytest.mark.parametrize(
    "mode,domain,geometry",
    [
        ("simclr", "time", (5000, 5000, 12)),
        ("cmsc", "frequency", (2500, 1250, 12)),
        ("cmlc", "time", (5000, 5000, 1)),
        ("cmsmlc", "frequency", (2500, 1250, 1)),
    ],
)
def test_input_geometry_is_the_shape_of_every_view(mode, domain, geometry):
    """input_geometry (what the encoder is initialised for) is the shape of each augmented view and of each
    classifier view of the same mode."""
    c = view_config(
        mode=mode, **{"data.domain": domain, "augment.view1": "none", "augment.view2": "none"}
    )
    assert views.input_geometry(c) == geometry
    x = jnp.zeros((2, 5000, 12), jnp.float32)
    _, enc_len, in_leads = geometry
    got = views.augmented_views(c, jax.random.PRNGKey(0), x)
    assert [v.shape for v in got] == [(2, enc_len, in_leads)] * len(got)
    spec = views.ViewSpec.from_pretrain_config(c)
    v = views.input_views(x, spec)
    assert v.shape == (
        (2, enc_len, in_leads) if mode == "simclr" else (2, spec.num_views, enc_len, in_leads)
    )


def test_view_pipeline_parses_reference_spellings_and_shared_permutation():
    c = view_config(
        **{
            "augment.view1": "time-wraping:4,0.2",
            "augment.view2": "permutation:5",
            "augment.permute_shared_leads": True,
        }
    )
    assert views.view_pipeline(c, "view1") == (Op("time_warp", (4, 0.2)),)
    assert views.view_pipeline(c, "view2") == (Op("permute", (5, 1)),)
    c.augment.view2 = "dropout"  # no parameter: the default
    assert views.view_pipeline(c, "view2") == (Op("dropout", (0.1,)),)
    c.augment.view2 = "lead_mask:2@0.5|permute"
    assert views.view_pipeline(c, "view2") == (Op("lead_mask", (2.0,), 0.5), Op("permute", (5, 1)))


@pytest.mark.parametrize("mode", ["cmsc", "cmlc", "cmsmlc"])
def test_augmented_views_route_halves_leads_and_augmentations(mode):
    """Which half and lead each view holds, which augmentation it gets, and one key per lead: view1 adds noise,
    view2 is the identity, and every lead of x is the same signal, so a view equals its raw slice exactly where no
    noise was drawn and two noised leads differ only through their keys."""
    cfg = view_config(mode=mode, **{"augment.view1": "gaussian_noise:0.5", "augment.view2": "none"})
    x = np.repeat(np.random.default_rng(0).normal(size=(3, 5000, 1)).astype(np.float32), 12, axis=2)
    got = [np.asarray(v) for v in views.augmented_views(cfg, jax.random.PRNGKey(7), x)]
    h1, h2 = x[:, :2500], x[:, 2500:]
    cols = [ecgcl_jax.LEADS.index(name) for name in cfg.clocs_leads]
    if mode == "cmsc":  # [h1 view1, h1 view2, h2 view1, h2 view2]
        want = [(h1, True), (h1, False), (h2, True), (h2, False)]
    elif mode == "cmlc":  # each selected lead of the whole ECG, view1
        want = [(x[:, :, c : c + 1], True) for c in cols]
    else:  # each selected lead of half 1 under view1, then of half 2 under view2
        want = [(h1[:, :, c : c + 1], True) for c in cols] + [
            (h2[:, :, c : c + 1], False) for c in cols
        ]
    assert len(got) == len(want)
    noised = []
    for v, (raw, noisy) in zip(got, want):
        assert v.shape == raw.shape
        if noisy:
            ratio = np.std(v - raw) / np.std(raw)
            assert 0.4 < ratio < 0.6, ratio  # N(0, 1) * 0.5 * std, per ECG and lead
            noised.append(v)
        else:
            np.testing.assert_array_equal(v, raw)
    # the single-lead views of one half: same signal, different keys, different noise
    if mode != "cmsc":
        for a in range(len(cols)):
            for b in range(a + 1, len(cols)):
                assert not np.allclose(noised[a], noised[b])


@pytest.mark.parametrize("mode", ["cmsc", "cmsmlc"])
def test_augmented_view_keys_follow_the_documented_rule(mode):
    """Each view equals augment.two_views of its slice under the key the module docstring states:
    fold_in(key, h) per half h (cmsc), fold_in(key, 100 h + lead column) (cmsmlc)."""
    leads = (
        "V2",
        "I",
        "aVR",
    )  # not in column order: the keys follow the column, the order the list
    p1, p2 = "gaussian_noise:0.5", "dropout:0.5"
    cfg = view_config(mode=mode, clocs_leads=leads, **{"augment.view1": p1, "augment.view2": p2})
    cols = [ecgcl_jax.LEADS.index(l) for l in leads]

    def expected(key, x):
        gidx = jnp.arange(x.shape[0], dtype=jnp.int32)
        halves = [x[:, :20], x[:, 20:]]
        if mode == "cmsc":
            return [
                v
                for h, seg in enumerate(halves, 1)
                for v in augment.two_views(jax.random.fold_in(key, h), seg, gidx, p1, p2)
            ]
        return [
            augment.two_views(
                jax.random.fold_in(key, 100 * h + j), seg[:, :, j : j + 1], gidx, p, "none"
            )[0]
            for h, (seg, p) in enumerate(zip(halves, (p1, p2)), 1)
            for j in cols
        ]

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 40, 12)), jnp.float32)
    key = jax.random.PRNGKey(11)
    got, want = views.augmented_views(cfg, key, x), expected(key, x)
    assert len(got) == len(want) == {"cmsc": 4, "cmsmlc": 6}[mode]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
