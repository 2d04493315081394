"""The command-line programs: `ecgcl-pretrain`, `ecgcl-eval`, `ecgcl-data`, `ecgcl-embed`.

Installed as console scripts (pyproject.toml). `run_pretrain.py`, `run_eval.py`, `python -m ecgcl_jax.data`
and `python -m ecgcl_jax.embed` call the same functions with their own program names. Importing this module is
light (standard library only): a SIGTERM while JAX loads is held (`preemption.hold_early_stop_signals`).

`--config` takes a file path (as before) or a shipped config's name (`config_files.resolve`). Pretraining and
evaluation also write their console output to WORKDIR/log.txt (`monitor.tee_console`).
"""

from __future__ import annotations

import os
import sys

from ecgcl_jax import cli, config_files, preemption
from ecgcl_jax.errors import UserError


def _prog(default: str) -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else default


def _parse_config_names(prog: str, argv: list[str]) -> list[str]:
    """argv with shipped config names resolved, and `configs` importable; exits 2 on an unknown name."""
    config_files.import_configs()
    try:
        return config_files.resolve_argv(argv)
    except UserError as e:
        sys.exit(cli.fail(prog, e))


def _config_workdir_command(
    argv: list[str] | None, prog: str | None, default_prog: str, config_help: str, workdir_help: str
):
    """The start that pretraining and evaluation share: hold early stop signals, resolve shipped config
    names in argv, and define --config (a config file, locked) and --workdir (required, not empty).

    Returns (prog, argv, the --config flag holder, the --workdir flag holder); the caller defines its
    own flags next.
    """
    preemption.hold_early_stop_signals()
    prog = prog or _prog(default_prog)
    argv = _parse_config_names(prog, list(sys.argv if argv is None else argv))

    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flag = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    flags.register_validator(
        "workdir", lambda v: bool(v and v.strip()), message="must not be empty"
    )
    return prog, argv, config_flag, workdir_flag


def pretrain_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`ecgcl-pretrain --config NAME|FILE --workdir DIR [--config.FIELD=VALUE ...]` (and run_pretrain.py).

    Multi-host: add --distributed (TPU pods / SLURM auto-detect) or
    --coordinator=HOST:PORT --num_processes=N --process_id=I on every process.
    """
    prog, argv, config_flag, workdir_flag = _config_workdir_command(
        argv,
        prog,
        "ecgcl-pretrain",
        "Pretraining config: a shipped config's name (cnn_attn_lstm, cnn, clocs_cmsc, ...) or a file.",
        "Run directory: metrics.jsonl, log.txt, checkpoints/, encoder/.",
    )

    from absl import app, flags  # noqa: PLC0415

    distributed = flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() (auto-detect)."
    )
    coordinator = flags.DEFINE_string(
        "coordinator", "", "Coordinator HOST:PORT for multi-process runs."
    )
    nproc = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
    pid = flags.DEFINE_integer("process_id", -1, "This process's id (multi-process runs).")

    def main(_):
        workdir = os.path.expanduser(workdir_flag.value)

        def run(stop):
            import importlib  # noqa: PLC0415

            from ecgcl_jax import pretrain  # noqa: PLC0415

            # every pretraining field, to check the config file has them all
            base = importlib.import_module("configs.base")
            return pretrain.run(cli.config_value(config_flag, base.get_config), workdir, stop=stop)

        from ecgcl_jax import monitor  # noqa: PLC0415

        with monitor.tee_console(workdir, prog, argv, pid.value):
            return cli.run_entry(
                prog, run, distributed.value, coordinator.value, nproc.value, pid.value
            )

    return _app_run(app, main, argv, prog)


def eval_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`ecgcl-eval --config eval[:PRETRAIN_CONFIG]|FILE --workdir DIR [--config.FIELD=VALUE ...]` (and
    run_eval.py). Writes WORKDIR/results.json, splits.json, results.md, results.csv, plots/, log.txt."""
    prog, argv, config_flag, workdir_flag = _config_workdir_command(
        argv,
        prog,
        "ecgcl-eval",
        "Evaluation config: eval, eval:clocs_cmsc, sweep_label_fraction, ... or a file.",
        "Evaluation directory (results, splits, per-repeat runs).",
    )

    from absl import app, flags  # noqa: PLC0415

    shard_flag = flags.DEFINE_string(
        "shard",
        "",
        "i/n (0 <= i < n): run only this process's share of the units (repeats, or variant x repeat of a "
        "sweep) in a --workdir shared with the other shards, e.g. "
        "--shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT in a job array --array=0-(n-1). The last "
        "shard to finish, or a run without --shard, writes the reports.",
    )
    deterministic = flags.DEFINE_bool(
        "deterministic",
        True,
        "Ask XLA for run-to-run deterministic GPU kernels (--xla_gpu_deterministic_ops), so a "
        "resumed or repeated evaluation gives the same numbers on GPUs too; no effect on CPU.",
    )

    def main(_):
        xla_flags = os.environ.get("XLA_FLAGS", "")
        if deterministic.value and "xla_gpu_deterministic_ops" not in xla_flags:
            # before JAX starts a backend
            os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_gpu_deterministic_ops=true".strip()
        workdir = os.path.expanduser(workdir_flag.value)

        def run(stop):
            import importlib  # noqa: PLC0415

            from ecgcl_jax import evaluate  # noqa: PLC0415

            # every evaluation field, to check the config file
            eval_config = importlib.import_module("configs.eval")
            return evaluate.run(
                cli.config_value(config_flag, eval_config.get_config),
                workdir,
                shard=shard_flag.value or None,
                stop=stop,
            )

        from ecgcl_jax import monitor  # noqa: PLC0415

        with monitor.tee_console(workdir, prog, argv):
            return cli.run_entry(prog, run)

    return _app_run(app, main, argv, prog)


def _app_run(app, main, argv: list[str], prog: str) -> int:
    try:
        app.run(main, argv=argv, flags_parser=cli.flags_parser(prog))
    except SystemExit as e:  # app.run exits with main's return value
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def data_main(argv: list[str] | None = None) -> int:
    """`ecgcl-data prepare SRC ... --out DIR` / `ecgcl-data info [DIR]`."""
    from ecgcl_jax.data import __main__ as data_cli  # noqa: PLC0415

    return data_cli.main(argv, prog="ecgcl-data")


def embed_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`ecgcl-embed --encoder WORKDIR --data DIR --out emb.npy` (and `python -m ecgcl_jax.embed`): the
    embeddings of a prepared dataset by an exported encoder (`embed.write_embeddings`)."""
    import argparse  # noqa: PLC0415

    prog = prog or _prog("ecgcl-embed")
    p = argparse.ArgumentParser(
        prog=prog, description="Embeddings of a prepared dataset by an exported encoder."
    )
    p.add_argument(
        "--encoder", required=True, help="exported encoder: pretraining WORKDIR or WORKDIR/encoder"
    )
    p.add_argument(
        "--data", default="", help='prepared dataset folder ("" = the embedded PTB-XL sample)'
    )
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument(
        "--views",
        default="mean",
        help="CLOCS view embeddings: mean | concat | none",
    )
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size: must be positive (got {args.batch_size})")
        from ecgcl_jax import data  # noqa: PLC0415 - JAX loads after the arguments are checked
        from ecgcl_jax import embed as embed_lib  # noqa: PLC0415

        enc = embed_lib.load_encoder(args.encoder)
        ds = data.open_dataset(args.data)
        z = embed_lib.embed_dataset(enc, ds, batch_size=args.batch_size, views=args.views)
        out, side = embed_lib.write_embeddings(args.out, z, ds)
    except (UserError, OSError) as e:
        return cli.fail(prog, e)
    print(f"wrote {out} {tuple(z.shape)} float32 and {side}")
    return 0


def _script(fn):
    """A console-script entry: the function's exit code as the process's."""
    return lambda: sys.exit(fn())


pretrain = _script(pretrain_main)
evaluate = _script(eval_main)
data = _script(data_main)
embed = _script(embed_main)
