"""Pretraining: CLI runs per encoder, exact resume, 1 vs 8 devices, config validation, the step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ecgcl_jax import checkpoint, input_pipeline, models, parallel, pretrain, views
from ecgcl_jax.data import open_dataset
from ecgcl_jax.errors import UserError
from tests.conftest import read_metrics, run_cli, small_config


def test_resume_equals_uninterrupted(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    pretrain.run(small_config(num_steps=12), full)
    r = pretrain.run(small_config(num_steps=6), part)
    assert r["steps"] == 6
    r = pretrain.run(small_config(num_steps=12), part)  # resume on the same workdir
    assert r["steps"] == 12
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 13))
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], atol=1e-5, rtol=0)
    assert all(np.isfinite(m["loss"]) and m["ecg_per_s"] > 0 for m in a)
    # loss goes down on the embedded data with a large learning rate
    assert np.mean([m["loss"] for m in a[-3:]]) < np.mean([m["loss"] for m in a[:3]])

    enc = checkpoint.load_encoder(os.path.join(full, "encoder"))
    assert enc.preprocessing["input_length"] == 5000 and enc.preprocessing["max_amp"] > 0
    assert "params" in enc.variables and "batch_stats" in enc.variables


@pytest.mark.parametrize("mode", ["simclr", "cmsc"])
def test_one_device_equals_eight(tmp_path, mode):
    assert jax.device_count() == 8
    losses = {}
    for n in (1, 8):
        wd = str(tmp_path / f"d{n}")
        # the reference's learning rate: with 1e-3 Adam amplifies float-rounding differences of near-zero gradients
        cfg = small_config(
            "cnn",
            num_steps=3,
            mode=mode,
            patient_positives=(mode == "cmsc"),
            **{"optim.learning_rate": 1e-5},
        )
        pretrain.run(cfg, wd, mesh=parallel.make_mesh(n))
        losses[n] = np.array([m["loss"] for m in read_metrics(wd)])
    np.testing.assert_allclose(losses[8][0], losses[1][0], rtol=1e-4)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-3)


@pytest.mark.parametrize("mode", ["simclr", "cmsc"])
def test_one_step_gradient_and_bn_stats_same_on_one_and_eight_devices(mode):
    """The loss test above runs at Adam's lr 1e-5, where a wrong gradient would hardly move the loss; here the
    optimizer is SGD with lr 1, so the parameter change *is* the gradient, compared leaf by leaf, together with
    the BatchNorm running statistics (global-batch statistics on 8 devices as on 1)."""

    cfg = small_config("cnn", mode=mode, patient_positives=(mode == "cmsc"))
    ds = open_dataset("")
    pool = np.arange(len(ds))
    model, tx = models.build_encoder(cfg.model), optax.sgd(1.0)
    out = {}
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        repl = parallel.replicated(mesh)
        state = jax.jit(lambda k: pretrain.init_state(cfg, model, tx, k), out_shardings=repl)(
            jax.random.PRNGKey(0)
        )
        src = input_pipeline.BatchSource(
            ds, pool, input_pipeline.BatchOrder(len(pool), 16, 0), mesh, True, 2, 1
        )
        batch = dict(
            src.device_batch(0),
            resident_raw=src.resident_raw,
            max_amp=parallel.replicate_from_host(
                mesh, np.asarray(input_pipeline.fit_max_amp(ds, pool), np.float32)
            ),
        )
        before = jax.device_get(state.params)
        new, m = jax.jit(pretrain.make_pretrain_step(cfg, model, tx), out_shardings=(repl, repl))(
            state, batch, jax.random.PRNGKey(1)
        )
        grad = jax.tree.map(lambda a, b: a - b, before, jax.device_get(new.params))
        out[n] = (grad, jax.device_get(new.batch_stats), float(m["loss"]))
    np.testing.assert_allclose(out[8][2], out[1][2], rtol=1e-5)
    # Tolerance: summation order differs across 8 shards, and the gradients of the first two conv layers pass back
    # through every BatchNorm (mean subtraction cancels): measured up to 2e-3 of a leaf's largest entry there
    # (1e-6 elsewhere). Statistics over 2 ECGs per device instead of 16, or a per-shard gradient, are not that close.
    for g8, g1 in zip(jax.tree.leaves(out[8][0]), jax.tree.leaves(out[1][0])):
        assert np.abs(g1).max() > 0
        np.testing.assert_allclose(g8, g1, rtol=1e-3, atol=5e-3 * np.abs(g1).max())
    for s8, s1 in zip(jax.tree.leaves(out[8][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(s8, s1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "mode,domain", [("cmlc", "time"), ("cmsmlc", "time"), ("simclr", "frequency")]
)
def test_clocs_lead_modes_and_frequency_domain_run(tmp_path, mode, domain):
    wd = str(tmp_path / mode)
    r = pretrain.run(small_config("cnn", num_steps=2, mode=mode, **{"data.domain": domain}), wd)
    assert r["steps"] == 2 and np.isfinite(r["final_loss"])
    prep = checkpoint.load_encoder(wd).preprocessing
    assert prep["in_leads"] == (1 if mode in ("cmlc", "cmsmlc") else 12)
    assert prep["input_length"] == {"cmlc": 5000, "cmsmlc": 2500, "simclr": 2500}[mode]


def test_cli_attn_lstm_writes_metrics_and_checkpoints(tmp_path):
    wd = str(tmp_path / "demo")
    p = run_cli(
        [
            "--config",
            "configs/cnn_attn_lstm.py",
            "--workdir",
            wd,
            "--config.num_steps=6",
            "--config.batch_size=8",
            "--config.log_every=2",
            "--config.checkpoint_every=3",
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(wd)
    assert [x["step"] for x in m] == [2, 4, 6]
    assert all(np.isfinite(x["loss"]) and x["ecg_per_s"] > 0 for x in m)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-1] == "6"
    assert "ETA" in p.stdout and "step 6/6" in p.stdout
    assert os.path.exists(os.path.join(wd, "encoder", "encoder.json"))


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.augment.view1=shuffle_leads", "augment.view1"),
        ("--config.augment.view2=permute:7", "augment.view2"),
        ("--config.batch_size=0", "batch_size"),
        ("--config.batch_size=12", "batch_size"),
        ("--config.data.path=/nonexistent/ecgs", "/nonexistent/ecgs"),
        ("--config.mode=cmxx", "mode"),
        ("--config.data.reader_threads=-1", "reader_threads"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, override, needle):
    p = run_cli(["--config", "configs/cnn.py", "--workdir", str(tmp_path / "w"), override])
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip() and "error" in l.lower()]
    assert lines and needle in lines[-1], p.stderr[-2000:]


def test_home_folder_in_paths_is_expanded(tmp_path, monkeypatch):
    # `--config.data.path=~/x` reaches the program unexpanded (a shell expands ~ only at the start of a word)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ds").mkdir()
    pretrain.validate_config(small_config(**{"data.path": "~/ds"}), 1)
    with pytest.raises(UserError, match="~/nope does not exist"):
        pretrain.validate_config(small_config(**{"data.path": "~/nope"}), 1)
    with pytest.raises(UserError, match=f"{tmp_path}/ds: holds no exported encoder"):
        checkpoint.load_encoder("~/ds")


@pytest.mark.parametrize(
    "over,needle",
    [
        # no negatives: a loss of exactly 0
        (
            {"batch_size": 1},
            "config.batch_size: must be at least 2",
        ),
        (
            {"mode": "cmlc", "clocs_leads": ("II", "V2", "II")},
            "config.clocs_leads: II listed more than once",
        ),
        ({"augment.view1": "permute:5,0.3"}, "shared_across_leads must be 0 or 1"),
        # numpy refused it with a traceback
        (
            {"seed": -3},
            r"config.seed: must be an integer in \[0, 2\*\*32\)",
        ),
        # jax keys hold 32 bits: it would repeat seed 0
        (
            {"seed": 2**32},
            r"config.seed: must be an integer in",
        ),
    ],
)
def test_configs_that_would_train_on_nothing_are_refused(over, needle):
    with pytest.raises(UserError, match=needle):
        pretrain.validate_config(small_config(**over), 1)
    pretrain.validate_config(small_config(**{"augment.view1": "permute:5,1", "batch_size": 2}), 1)


def test_patient_positives_with_a_single_patient_is_refused(tmp_path):
    class OnePatient:  # the embedded set, every record given to one patient
        def __init__(self, ds):
            self._ds = ds

        def __getattr__(self, name):
            return getattr(self._ds, name)

        def __len__(self):
            return len(self._ds)

        patient_ids = property(lambda self: np.array(["p1"] * len(self._ds)))

    ds = OnePatient(open_dataset(""))
    with pytest.raises(
        UserError,
        match="config.patient_positives: all 52 pretraining records belong to one patient",
    ):
        pretrain.run(small_config(patient_positives=True), str(tmp_path / "w"), dataset=ds)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "cfg",
    [
        "configs/cnn.py",
        "configs/cnn_lstm.py",
        "configs/cnn_transformer.py",
        "configs/clocs_cmsc.py",
        "configs/clocs_cmlc.py",
        "configs/clocs_cmsmlc.py",
    ],
)
def test_every_config_pretrains_from_cli(tmp_path, cfg):
    wd = str(tmp_path / "w")
    p = run_cli(
        [
            "--config",
            cfg,
            "--workdir",
            wd,
            "--config.num_steps=2",
            "--config.batch_size=8",
            "--config.log_every=1",
            "--config.checkpoint_every=2",
            "--config.model.emb_dim=32",
            "--config.model.proj_dim=16",
            "--config.patient_positives=True",
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(wd)
    assert [x["step"] for x in m] == [1, 2] and all(np.isfinite(x["loss"]) for x in m)
    assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))


@pytest.mark.parametrize("mode", ["cmlc", "cmsmlc"])
def test_vcg_rotate_scale_is_refused_for_single_lead_views(mode):
    cfg = small_config(mode=mode, **{"augment.view1": "gaussian_noise|vcg_rotate_scale@0.5"})
    with pytest.raises(UserError) as e:
        pretrain.validate_config(cfg, 1)
    msg = str(e.value)
    assert msg.startswith(
        "config.augment.view1: step 2 (vcg_rotate_scale): needs the 12 standard leads"
    )
    assert "\n" not in msg
    pretrain.validate_config(small_config(**{"augment.view1": "vcg_rotate_scale@0.5"}), 1)


def test_rerun_of_a_finished_run_returns_without_training_or_exporting_again(tmp_path):
    wd = str(tmp_path)
    view1 = "amplitude_scale:0.8,1.2@0.5|gaussian_noise"
    first = pretrain.run(small_config(num_steps=2, **{"augment.view1": view1}), wd)
    enc = os.path.join(wd, "encoder", "variables.msgpack")
    stamp, lines = os.stat(enc).st_mtime_ns, read_metrics(wd)
    # the parsed pipelines are recorded beside the config's own fields, and in the exported encoder
    want = {
        "view1": {
            "spec": "amplitude_scale:0.8,1.2,0@0.5|gaussian_noise:0.05",
            "ops": [
                {
                    "op": "amplitude_scale",
                    "params": {"low": 0.8, "high": 1.2, "per_lead": 0},
                    "prob": 0.5,
                },
                {"op": "gaussian_noise", "params": {"factor": 0.05}, "prob": 1.0},
            ],
        },
        "view2": {
            "spec": "dropout:0.1",
            "ops": [{"op": "dropout", "params": {"rate": 0.1}, "prob": 1.0}],
        },
    }
    with open(os.path.join(wd, "config.json")) as f:
        saved = json.load(f)
    assert saved["augment_pipelines"] == want and saved["augment"]["view1"] == view1
    with open(os.path.join(wd, "encoder", "encoder.json")) as f:
        assert json.load(f)["extra"]["augment_pipelines"] == want
    # a resumable change only: the recorded pipelines do not count as a changed field
    again = pretrain.run(small_config(num_steps=2, log_every=2, **{"augment.view1": view1}), wd)
    assert (
        again["status"] == "done"
        and again["steps"] == 2
        and again["final_loss"] == first["final_loss"]
    )
    assert os.stat(enc).st_mtime_ns == stamp and read_metrics(wd) == lines
    with pytest.raises(Exception, match="changed fields"):  # the workdir check still runs first
        pretrain.run(small_config(num_steps=2, **{"model.emb_dim": 16}), wd)


def test_step_runs_one_encoder_forward_per_view():
    """The step's loss equals the encoder applied to each view on its own (BatchNorm statistics per view, running
    statistics chained) followed by the contrastive loss; one forward over the stacked views would not."""

    cfg = small_config(
        "cnn",
        mode="cmsc",
        **{
            "model.dropout": 0.0,
            "augment.view1": "none",
            "augment.view2": "none",
            "model.channels": (4, 4, 4, 4, 4),
        },
    )
    model, tx = models.build_encoder(cfg.model), optax.sgd(0.0)
    state = pretrain.init_state(cfg, model, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    raw = rng.integers(-800, 800, size=(8, 5000, 12)).astype(np.int16)
    # amplitudes that differ between ECGs and halves make pooled statistics differ from per-view ones
    raw[:4] *= 3
    raw[:, 2500:] //= 4
    batch = {
        "raw": raw,
        "scale": np.full(8, 1e-3, np.float32),
        "ids": np.arange(8, dtype=np.int32),
        "max_amp": np.float32(3.0),
    }
    new, m = jax.jit(pretrain.make_pretrain_step(cfg, model, tx))(
        state, batch, jax.random.PRNGKey(1)
    )

    @jax.jit
    def reference(params, batch_stats, raw):
        x = input_pipeline.normalize(raw.astype(jnp.float32) * 1e-3, jnp.float32(3.0))
        # identity augmentations: the key does not matter
        inputs = views.augmented_views(cfg, jax.random.PRNGKey(0), x)
        bs, zs = batch_stats, []
        for v in inputs:
            (_, z), upd = model.apply(
                {"params": params, "batch_stats": bs}, v, train=True, mutable=["batch_stats"]
            )
            bs = upd["batch_stats"]
            zs.append(z)
        (_, pooled), _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            jnp.concatenate(inputs),
            train=True,
            mutable=["batch_stats"],
        )
        return (
            pretrain.contrastive_loss(cfg, zs, None),
            bs,
            pretrain.contrastive_loss(cfg, list(jnp.split(pooled, len(inputs))), None),
        )

    want, bs, pooled_loss = reference(state.params, state.batch_stats, raw)
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.batch_stats, bs
    )
    assert abs(float(pooled_loss) - float(want)) > 1e-3
