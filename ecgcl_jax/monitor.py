"""Watching a run: the console copied to WORKDIR/log.txt, TensorBoard curves, the loss PNG, evaluation progress.

Pretraining (`PretrainMonitor`): WORKDIR/tensorboard/ (scalars loss, loss_mean, ecg_per_s, learning_rate, by
step) and WORKDIR/loss.png (loss and loss_mean against step, from metrics.jsonl), refreshed at each checkpoint
and at the end. Evaluation (`EvalProgress`): one progress line per fine-tuning epoch with an ETA for the whole
evaluation, TensorBoard scalars per repeat and method in WORKDIR/tensorboard/seed_S/METHOD/ (train_loss,
val_loss, val_<metric> by epoch), and `plot_eval_curves` for plots/training_curves.png.

TensorBoard files need the optional extra (`pip install 'ecgcl-jax[tensorboard]'`); without it a run says so in
one line and writes everything else. Only the standard library is imported here; matplotlib and
tensorboard when first used.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from ecgcl_jax.fileio import atomic_write

TENSORBOARD_HINT = (
    "TensorBoard curves need the tensorboard package: pip install 'ecgcl-jax[tensorboard]' "
    "(metrics.jsonl and the PNG plots are written without it)"
)
LOG_FILE = "log.txt"
LOSS_PNG = "loss.png"


# -------------------------------------------------------------------------------------- the log file
class _Tee:
    """A text stream writing to `stream` and to the log file `copy`; other attributes are `stream`'s."""

    def __init__(self, stream, copy):
        self._stream, self._copy = stream, copy

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        try:
            self._copy.write(s)
        except (OSError, ValueError):  # a full disk or a closed file must not stop the run
            pass
        return n

    def flush(self) -> None:
        self._stream.flush()
        with contextlib.suppress(OSError, ValueError):
            self._copy.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _RunLog:
    """WORKDIR/<name>, appended to once the run has made WORKDIR (what came before is kept in memory until
    then), so that a run stopped before it starts (a config error) leaves no folder behind."""

    def __init__(self, workdir: str, name: str, header: str):
        self.workdir, self.path = workdir, os.path.join(workdir, name)
        self.pending: list[str] | None = [header]
        self.file = None

    def _open(self) -> None:
        if self.pending is None or not os.path.isdir(self.workdir):
            return
        try:
            self.file = open(self.path, "a", buffering=1, encoding="utf-8")
            self.file.write("".join(self.pending))
        except OSError:  # an unwritable workdir: the run reports it itself
            self.file = None
        self.pending = None

    def write(self, s: str) -> None:
        if self.file is not None:
            self.file.write(s)
        elif self.pending is not None:
            self.pending.append(s)
            self._open()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        self._open()
        if self.file is not None:
            self.file.close()
            self.file = None


@contextlib.contextmanager
def tee_console(workdir: str, prog: str, argv: Sequence[str], process_id: int = -1):
    """Inside the block, what the program prints (stdout and stderr) is appended to WORKDIR/log.txt too
    (WORKDIR/log.process<N>.txt for a multi-process run's process N > 0), after a line naming the command.
    Nothing is written, and no folder made, unless the run itself makes WORKDIR (or it exists)."""
    name = LOG_FILE if process_id <= 0 else f"log.process{process_id}.txt"
    header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {prog} {shlex.join(list(argv)[1:])}\n"
    log = _RunLog(workdir, name, header)
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old[0], log), _Tee(old[1], log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
        log.close()


# ------------------------------------------------------------------------------------- TensorBoard
def have_tensorboard() -> bool:
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class ScalarWriter:
    """TensorBoard scalars into an event file in `logdir`, with tensorboard's own writer (no TensorFlow)."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: PLC0415
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(logdir)

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """One event at `step` with every finite value of `values` (tag -> number)."""
        vals = [
            self._summary.Value(tag=k, simple_value=float(v))
            for k, v in values.items()
            if v is not None and math.isfinite(float(v))
        ]
        if vals:
            self._writer.add_event(
                self._event(
                    wall_time=time.time(), step=int(step), summary=self._summary(value=vals)
                )
            )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def scalar_writer(logdir: str, log: Callable[[str], None]) -> ScalarWriter | None:
    """A ScalarWriter, or None after one line naming the extra to install when tensorboard is missing."""
    if not have_tensorboard():
        log(TENSORBOARD_HINT)
        return None
    return ScalarWriter(logdir)


# ------------------------------------------------------------------------------------- pretraining
class PretrainMonitor:
    """TensorBoard scalars and WORKDIR/loss.png for a pretraining run (a no-op where `enabled` is False: the
    processes other than 0)."""

    def __init__(self, workdir: str, log: Callable[[str], None], enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled
        self.writer = scalar_writer(os.path.join(workdir, "tensorboard"), log) if enabled else None
        self._unplotted = True  # records since loss.png was last written

    def record(self, rec: Mapping) -> None:
        """A metrics.jsonl record (step, loss, loss_mean, ecg_per_s, learning_rate) into TensorBoard."""
        self._unplotted = True
        if self.writer is None:
            return
        self.writer.scalars(
            rec["step"],
            {
                "loss": rec.get("loss"),
                "loss_mean": rec.get("loss_mean"),
                "ecg_per_s": rec.get("ecg_per_s"),
                "learning_rate": rec.get("learning_rate"),
            },
        )
        self.writer.flush()

    def plot(self) -> None:
        """Rewrite WORKDIR/loss.png from WORKDIR/metrics.jsonl (every logged step, resumed runs included)."""
        if not (self.enabled and self._unplotted):
            return
        self._unplotted = False
        plot_loss(os.path.join(self.workdir, "metrics.jsonl"), os.path.join(self.workdir, LOSS_PNG))

    def close(self) -> None:
        self.plot()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())  # a reader never sees half a PNG


def plot_loss(metrics_path: str, png_path: str) -> bool:
    """loss (last step of each logged interval) and loss_mean (mean over the interval) against step, from a
    metrics.jsonl; returns False (and writes nothing) when it holds no line yet."""
    steps, loss, mean = [], [], []
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    step = int(r["step"])
                except (ValueError, KeyError, TypeError):
                    continue
                steps.append(step)
                loss.append(math.nan if r.get("loss") is None else float(r["loss"]))
                mean.append(math.nan if r.get("loss_mean") is None else float(r["loss_mean"]))
    except OSError:
        return False
    if not steps:
        return False
    fig = figure(6.0, 4.0)
    ax = fig.subplots()
    ax.plot(steps, mean, label="loss_mean (interval mean)", lw=1.5)
    ax.plot(steps, loss, label="loss (logged step)", lw=0.8, alpha=0.6, marker=".", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(f"pretraining loss: {os.path.basename(os.path.dirname(png_path)) or png_path}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, png_path)
    return True


# -------------------------------------------------------------------------------------- evaluation
def fmt_duration(seconds: float) -> str:
    """H:MM:SS, or ? when not finite."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def val_metric(scores, metric: str) -> float:
    """The validation metric `metric` of an epoch's scores (a dict), NaN when absent or null."""
    v = scores.get(metric) if isinstance(scores, Mapping) else None
    return math.nan if v is None else float(v)


class EvalProgress:
    """One line per fine-tuning epoch and an ETA for the whole evaluation; TensorBoard curves per repeat and
    method. `total_epochs`: the epochs this invocation will train (repeats left x methods x epochs)."""

    def __init__(
        self,
        workdir: str,
        total_epochs: int,
        log: Callable[[str], None],
        metric: str = "auroc",
        enabled: bool = True,
    ):
        self.workdir, self.total, self.log, self.metric = workdir, max(1, total_epochs), log, metric
        self.enabled = enabled
        self.done, self.t0 = 0, time.perf_counter()
        self.tensorboard = enabled and have_tensorboard()
        if enabled and not self.tensorboard:
            log(TENSORBOARD_HINT)
        self._writers: dict[tuple, ScalarWriter] = {}

    def on_epoch(
        self, repeat: str, seed: int, method: str, num_epochs: int, workdir: str | None = None
    ) -> Callable[[dict], None]:
        """The callback for one method of one repeat: called with each epoch's history entry
        ({'epoch', 'train_loss', 'val_loss', 'val': scores})."""

        def report(entry: Mapping) -> None:
            self.done += 1
            if not self.enabled:
                return
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * max(0, self.total - self.done)
            v = val_metric(entry.get("val"), self.metric)
            self.log(
                f"{repeat} (seed {seed}) {method:<24s} epoch {entry['epoch']}/{num_epochs}  "
                f"train loss {entry['train_loss']:.4f}  val loss {entry['val_loss']:.4f}  "
                f"val {self.metric} {v:.4f}  ETA (evaluation) {fmt_duration(eta)}"
            )
            if self.tensorboard:
                key = (workdir or self.workdir, seed, method)
                if key not in self._writers:
                    self._writers[key] = ScalarWriter(
                        os.path.join(key[0], "tensorboard", f"seed_{seed}", method)
                    )
                w = self._writers[key]
                w.scalars(
                    entry["epoch"],
                    {
                        "train_loss": entry["train_loss"],
                        "val_loss": entry["val_loss"],
                        f"val_{self.metric}": v,
                    },
                )
                w.flush()

        return report

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def plot_eval_curves(
    histories: Mapping[str, Mapping[int, Sequence[Mapping]]],
    path: str,
    title: str,
    metric: str = "auroc",
    method_titles: Mapping[str, str] | None = None,
):
    """Per method (a row): training and validation loss (left) beside the validation metric (right), one line
    per repeat, against epoch. Panels of one column share their y-scale, so methods compare at a glance.

    histories: {method: {seed: [{'epoch', 'train_loss', 'val_loss', 'val': scores}, ...]}}. Returns the
    matplotlib Figure.
    """
    methods = list(histories)
    rows = max(1, len(methods))
    fig = figure(9.0, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, 2, squeeze=False, sharex=True, sharey="col")
    names = method_titles or {}
    for (ax_loss, ax_val), method in zip(axes, methods):
        for i, (seed, hist) in enumerate(histories[method].items()):
            ep = [h["epoch"] for h in hist]
            color = f"C{i % 10}"
            ax_loss.plot(
                ep, [h["train_loss"] for h in hist], color=color, label=f"seed {seed} train"
            )
            ax_loss.plot(
                ep, [h["val_loss"] for h in hist], color=color, ls="--", label=f"seed {seed} val"
            )
            ax_val.plot(
                ep,
                [val_metric(h.get("val"), metric) for h in hist],
                color=color,
                marker="o",
                ms=3,
                label=f"seed {seed}",
            )
        label = names.get(method, method)
        ax_loss.set_ylabel(f"{label}\nloss (BCE)", fontsize=8)
        ax_val.set_ylabel(f"validation {metric}", fontsize=8)
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
        ax_loss.legend(fontsize=6, ncol=2)
        ax_val.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    axes[0][0].set_title("training (solid) and validation (dashed) loss", fontsize=9)
    axes[0][1].set_title(f"validation {metric}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig


def eval_title(dataset: str, task: str, encoder: str) -> str:
    """The evaluation plots' title: dataset, task (label column) and encoder."""
    return f"dataset {dataset or '?'}  ·  task {task or '?'}  ·  encoder {encoder or '?'}"
