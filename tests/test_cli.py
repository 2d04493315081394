"""Entry-point plumbing: one-line errors, config-file and flag parsing, stop signals held while starting."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ecgcl_jax import cli, preemption
from tests.conftest import PY, ROOT, run_cli

CONFIG_FILE_ERRORS = {  # config file text (None: no file) and extra args -> what the one line must say
    "missing": (None, [], "No such file or directory"),
    "syntax": ("def get_config(:\n", [], ":1: SyntaxError"),
    "raises": (
        "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict().nope\n",
        [],
        ":3: AttributeError",
    ),
    "raises ValueError": (
        "def get_config():\n  raise ValueError('no such encoder here')\n",
        [],
        ":2: ValueError: no such encoder here",
    ),
    "unknown override": (
        "from configs.cnn import get_config\n",
        ["--config.model.chanels=3"],
        "no field 'chanels'; did you mean \"channels\"",
    ),
    "bad override value": (
        "from configs.cnn import get_config\n",
        ["--config.batch_size=abc"],
        "batch_size=abc: invalid literal",
    ),
    # a config written for an older version, without a field added since
    "field missing": (
        "from configs.cnn import get_config as full\n\ndef get_config():\n  c = full()\n"
        "  c.unlock()\n  del c.data['reader_threads']\n  return c\n",
        [],
        "lacks field(s) data.reader_threads",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_FILE_ERRORS))
@pytest.mark.parametrize("entry", ["run_pretrain.py", "run_eval.py"])
def test_config_file_and_flag_errors_are_one_line(tmp_path, case, entry):
    text, extra, needle = CONFIG_FILE_ERRORS[case]
    cfg = tmp_path / "my_config.py"
    if text is not None:
        cfg.write_text(text)
    if entry == "run_eval.py" and case in ("unknown override", "bad override value"):
        cfg.write_text("from configs.eval import get_config\n")
        extra = [a.replace("--config.", "--config.pretrain.") for a in extra]
    if entry == "run_eval.py" and case == "field missing":
        cfg.write_text(
            text.replace("configs.cnn", "configs.eval").replace("c.data[", "c.pretrain.data[")
        )
        # config.data is config.pretrain.data: named under both
        needle = "pretrain.data.reader_threads"
    p = subprocess.run(
        [
            PY,
            os.path.join(ROOT, entry),
            "--config",
            str(cfg),
            "--workdir",
            str(tmp_path / "w"),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{entry}: error: ") and needle in lines[0], (
        p.stderr[-2000:]
    )
    if case in ("missing", "syntax", "raises", "raises ValueError", "field missing"):
        assert "my_config.py" in lines[0]
    assert not (tmp_path / "w").exists()  # nothing was started


def test_uncreatable_workdir_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    wd = tmp_path / "a_file" / "w"
    args = ["--config", "configs/cnn.py", "--workdir", str(wd), "--config.num_steps=1"]
    last_line = f"run_pretrain.py: error: {wd}: Not a directory"
    p = run_cli(args)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == last_line
    assert "Traceback" not in p.stderr
    # ECGCL_JAX_TRACEBACK=1 shows where an OSError came from, before the same last line
    p = run_cli(args, env=dict(os.environ, ECGCL_JAX_TRACEBACK="1"))
    assert p.returncode == 2 and "Traceback" in p.stderr and "makedirs" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == last_line


def test_stop_signal_before_the_run_started_reaches_its_handler():
    # run_pretrain.py / run_eval.py hold SIGTERM from their first lines (it killed them while JAX loaded); the run's
    # handler gets it when installed, so the run stops the way it does for a later signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        preemption.hold_early_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        got = []
        with preemption.on_stop_signals(lambda signum, frame: got.append(signum)):
            assert got == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGINT)  # inside the block: straight to the handler
            time.sleep(0.05)
        assert got == [signal.SIGTERM, signal.SIGINT] and not preemption._EARLY_SIGNALS
        # the hold ends with the block: after it, the default handlers (a signal while writing results is not eaten)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        preemption.hold_early_stop_signals()
        preemption.release_early_stop_signals()
        assert (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
            and not preemption._EARLY_SIGNALS
        )
        # a second signal while still starting stops the process at once, as the signal does by default
        code = (
            "import os, signal, time\nfrom ecgcl_jax import preemption\npreemption.hold_early_stop_signals()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nprint('held', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\nprint('not stopped')\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == -signal.SIGTERM and r.stdout == "held\n", (
            r.returncode,
            r.stdout,
            r.stderr,
        )
        assert (
            r.stderr.splitlines()[-1]
            == "received SIGTERM again; stopping now (nothing to save yet)"
        )
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_full_disk_inside_orbax_is_one_line(capsys):
    # orbax reports ENOSPC as ValueError: RESOURCE_EXHAUSTED; it ended the run with a traceback and exit code 1
    def save(stop):
        raise ValueError(
            "RESOURCE_EXHAUSTED: Failed to write /w/checkpoints/3/x: No space left on device "
            "[os_error_code='28']"
        )

    assert cli.run_entry("run_pretrain.py", save) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "run_pretrain.py: error: no space left on device (RESOURCE_EXHAUSTED"
    )

    def bug(stop):
        raise ValueError("a bug, not the disk")

    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        cli.run_entry("run_pretrain.py", bug)
