"""The built wheel, installed non-editable into a fresh environment, runs from another directory: the installed
commands pretrain a few steps (a shipped config by name), evaluate (smoke), embed, and show the embedded data.

Offline: the wheel is built without build isolation, and the fresh environment sees this environment's
packages (the dependencies) through a .pth file, so nothing is downloaded.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.num_steps=2",
    "--config.batch_size=16",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.model.channels=(4,4)",
]


def _run(args, cwd, env):
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (
        f"{args[0]}: rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    )
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh venv holding the installed wheel, a scratch folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ecgcl_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, no constraints from the machine's pip config
    pip = [sys.executable, "-m", "pip"]
    _run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            "dist",
            "./src",
        ],
        tmp,
        env,
    )
    (wheel,) = (tmp / "dist").glob("ecgcl_jax-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies: this environment's packages, after the venv's own (a path, not its .pth files, so
    # an editable install of the checkout stays invisible)
    with open(os.path.join(site, "_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
        tmp,
        env,
    )
    work = tmp / "elsewhere"
    work.mkdir()
    env = dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    where = _run([py, "-c", "import ecgcl_jax; print(ecgcl_jax.__file__)"], work, env).stdout
    assert where.strip().startswith(str(venv)), where  # the installed copy, not the checkout
    return venv / "bin", work, env


def test_installed_commands_from_another_directory(installed):
    bindir, work, env = installed
    info = _run([bindir / "ecgcl-data", "info"], work, env).stdout
    assert "n=52" in info  # the embedded PTB-XL sample's records

    # a user's own config file, built on a shipped one as the shipped variants are
    (work / "mine.py").write_text(
        "from configs import cnn\n\n\ndef get_config():\n    c = cnn.get_config()\n"
        "    c.model.emb_dim = 16\n    return c\n"
    )
    p = _run(
        [bindir / "ecgcl-pretrain", "--config", "mine.py", "--workdir", "pre", *TINY], work, env
    )
    assert "step 1/2" in p.stdout and "(includes compilation)" in p.stdout
    lines = (work / "pre" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]
    assert (work / "pre" / "encoder" / "encoder.json").is_file()
    assert (work / "pre" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (work / "pre" / "log.txt").read_text()
    assert "ecgcl-pretrain" in log and "done: 2 steps" in log
    if importlib.util.find_spec("tensorboard") is not None:  # the extra: curves TensorBoard reads
        # deferred: tensorboard is an optional extra
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(work / "pre" / "tensorboard"))
        acc.Reload()
        logged = [json.loads(l)["loss"] for l in lines]
        np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], logged, rtol=1e-6)
        assert {"loss_mean", "ecg_per_s", "learning_rate"} <= set(acc.Tags()["scalars"])

    _run([bindir / "ecgcl-embed", "--encoder", "pre", "--out", "emb.npy"], work, env)
    assert np.load(work / "emb.npy").shape == (52, 16)

    p = _run(
        [
            bindir / "ecgcl-eval",
            "--config",
            "eval:cnn",
            "--workdir",
            "ev",
            "--config.repeats=1",
            "--config.encoder_checkpoint=pre",
            "--config.allow_leakage=True",
            "--config.finetune.num_epochs=1",
            "--config.finetune.batch_size=16",
            "--config.baselines=()",
        ],
        work,
        env,
    )
    assert "epoch 1/1" in p.stdout and "ETA (evaluation)" in p.stdout
    res = json.loads((work / "ev" / "results.json").read_text())
    assert res["status"] == "done" and len(res["repeats"]) == 1
    assert (work / "ev" / "plots" / "training_curves.png").stat().st_size > 0
    assert "epoch 1/1" in (work / "ev" / "log.txt").read_text()


def test_unknown_config_name_is_one_line(installed):
    bindir, work, env = installed
    p = subprocess.run(
        [bindir / "ecgcl-pretrain", "--config", "no_such", "--workdir", "x"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "ecgcl-pretrain: error: --config: no_such is neither"
    )
    assert "cnn_attn_lstm" in err[0]
