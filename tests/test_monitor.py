"""monitor: the console log file, TensorBoard event files (read back with TensorBoard's own reader), the loss PNG,
evaluation progress lines and curves."""

import io
import json
import math
import sys

import matplotlib.image
import numpy as np
import pytest

from ecgcl_jax import monitor

PNG = b"\x89PNG\r\n\x1a\n"


def _tb_reader():
    pytest.importorskip(
        "tensorboard",
        reason="the optional tensorboard extra is not installed (pip install 'ecgcl-jax[tensorboard]')",
    )
    # deferred: tensorboard is an optional extra (skipped above when absent)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(logdir):
        acc = EventAccumulator(str(logdir))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    return read


def _png_pixels(path):
    data = path.read_bytes()
    assert data[:8] == PNG
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def test_console_goes_to_the_log_file_too(tmp_path, capsys):
    wd = tmp_path / "run"
    with monitor.tee_console(str(wd), "ecgcl-pretrain", ["ecgcl-pretrain", "--workdir", "run"]):
        print("devices: 8")  # before the run made its workdir: kept until it does
        wd.mkdir()
        print("step 1/2  loss 1.0")
        print("a warning", file=sys.stderr)
    print("after the block")
    out = capsys.readouterr()
    assert "step 1/2" in out.out and "a warning" in out.err  # still on the console
    lines = (wd / "log.txt").read_text().splitlines()
    assert lines[0].startswith("==== ") and lines[0].endswith("ecgcl-pretrain --workdir run")
    assert lines[1:] == ["devices: 8", "step 1/2  loss 1.0", "a warning"]
    # a second run appends; another process of a multi-process run has its own file
    with monitor.tee_console(str(wd), "p", ["p"], process_id=1):
        print("from process 1")
    assert (wd / "log.process1.txt").read_text().splitlines()[1] == "from process 1"
    assert "from process 1" not in (wd / "log.txt").read_text()
    # a run that stops before making its workdir (a config error) leaves no folder; nor does a workdir that
    # is a file
    afile = tmp_path / "afile"
    afile.write_text("")
    for where in (tmp_path / "never", afile):
        with monitor.tee_console(str(where), "p", ["p"]):
            print("p: error: config.num_steps: must be positive", file=sys.stderr)
        assert "p: error" in capsys.readouterr().err
    assert not (tmp_path / "never").exists() and afile.read_text() == ""


def _metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_loss_png_written_and_readable(tmp_path):
    recs = [
        {"step": s, "loss": 5.0 / s, "loss_mean": 6.0 / s, "ecg_per_s": 100.0} for s in (2, 4, 6)
    ]
    recs[1]["loss"] = None  # a non-finite loss is logged as null
    _metrics(tmp_path / "metrics.jsonl", recs)
    assert monitor.plot_loss(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    img = _png_pixels(tmp_path / "loss.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # nothing logged yet: no picture
    (tmp_path / "empty.jsonl").write_text("")
    assert not monitor.plot_loss(str(tmp_path / "empty.jsonl"), str(tmp_path / "e.png"))
    assert not (tmp_path / "e.png").exists()


def test_pretrain_tensorboard_scalars_read_back(tmp_path):
    read = _tb_reader()
    lines = []
    # the learning rate each record logged (a schedule's: warmup, then decay)
    recs = [
        {"step": 10, "loss": 4.5, "loss_mean": 4.75, "ecg_per_s": 12.5, "learning_rate": 1e-3},
        {"step": 20, "loss": 3.25, "loss_mean": 3.5, "ecg_per_s": 250.0, "learning_rate": 5e-4},
        {
            "step": 30,
            "loss": None,
            "loss_mean": math.nan,
            "ecg_per_s": 240.0,
            "learning_rate": 2.5e-4,
        },
    ]
    with monitor.PretrainMonitor(str(tmp_path), lines.append) as board:
        for r in recs:
            board.record(r)
    assert lines == []  # tensorboard present: no hint
    got = read(tmp_path / "tensorboard")
    assert got["loss"] == [(10, 4.5), (20, 3.25)]  # non-finite values are left out
    assert got["loss_mean"] == [(10, 4.75), (20, 3.5)]
    assert got["ecg_per_s"] == [(10, 12.5), (20, 250.0), (30, 240.0)]
    assert [s for s, _ in got["learning_rate"]] == [10, 20, 30]
    assert got["learning_rate"][0][1] == pytest.approx(1e-3, rel=1e-7)  # stored as float32
    assert [v for _, v in got["learning_rate"]] == pytest.approx([1e-3, 5e-4, 2.5e-4], rel=1e-7)


def test_missing_tensorboard_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor, "have_tensorboard", lambda: False)
    lines = []
    with monitor.PretrainMonitor(str(tmp_path), lines.append) as board:
        board.record({"step": 1, "loss": 1.0, "loss_mean": 1.0, "ecg_per_s": 1.0})
    assert lines == [monitor.TENSORBOARD_HINT]
    assert "pip install 'ecgcl-jax[tensorboard]'" in lines[0] and "\n" not in lines[0]
    assert not (tmp_path / "tensorboard").exists()
    ev = []
    monitor.EvalProgress(str(tmp_path), 4, ev.append)
    assert ev == [monitor.TENSORBOARD_HINT]


def test_eval_progress_lines_eta_and_curves(tmp_path, monkeypatch):
    read = _tb_reader()
    clock = iter([100.0, 110.0, 130.0])  # start, after epoch 1, after epoch 2
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    lines = []
    prog = monitor.EvalProgress(str(tmp_path), 4, lines.append)  # 4 epochs in all
    report = prog.on_epoch("repeat 1/2", 321, "finetune", 2)
    for e, (tl, vl, auc) in enumerate([(0.7, 0.69, 0.6), (0.5, 0.6, 0.75)], start=1):
        report({"epoch": e, "train_loss": tl, "val_loss": vl, "val": {"auroc": auc}})
    prog.close()
    # ETA: elapsed / epochs done * epochs left = 10/1*3 = 30 s, then 30/2*2 = 30 s
    assert lines == [
        "repeat 1/2 (seed 321) finetune                 epoch 1/2  train loss 0.7000  val loss 0.6900  "
        "val auroc 0.6000  ETA (evaluation) 0:00:30",
        "repeat 1/2 (seed 321) finetune                 epoch 2/2  train loss 0.5000  val loss 0.6000  "
        "val auroc 0.7500  ETA (evaluation) 0:00:30",
    ]
    got = read(tmp_path / "tensorboard" / "seed_321" / "finetune")
    np.testing.assert_allclose([v for _, v in got["val_auroc"]], [0.6, 0.75], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["train_loss"]], [0.7, 0.5], rtol=1e-6)
    assert [s for s, _ in got["val_loss"]] == [1, 2]


def test_eval_curves_share_y_scale_and_name_the_run(tmp_path):
    def hist(scale):
        return [
            {
                "epoch": e,
                "train_loss": scale / e,
                "val_loss": scale / e + 0.1,
                "val": {"auroc": 0.5 + scale * e / 10},
            }
            for e in (1, 2, 3)
        ]

    hists = {"finetune": {321: hist(0.2), 123: hist(0.3)}, "linear_probe": {321: hist(0.9)}}
    path = tmp_path / "curves.png"
    title = monitor.eval_title("ptbxl", "normal", "cnn")
    fig = monitor.plot_eval_curves(hists, str(path), title)
    assert _png_pixels(path).shape[0] > 100
    axes = np.asarray(fig.axes[:4]).reshape(2, 2)  # rows: methods; columns: loss, validation metric
    assert axes[0][0].get_ylim() == axes[1][0].get_ylim()  # loss panels compare on one scale
    assert axes[0][1].get_ylim() == axes[1][1].get_ylim()
    assert fig._suptitle.get_text() == "dataset ptbxl  ·  task normal  ·  encoder cnn"
    assert [len(ax.get_lines()) for ax in axes[:, 0]] == [4, 2]  # train and val loss per repeat
