"""The ``kode`` command: models, train, finetune, tune, check-gradients, export, predict.

Bad input prints one line ``kode: error: …`` and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from kode.errors import EXIT_USAGE, KodeError, error_line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        command = self.prog.removeprefix("kode").strip()
        raise KodeError(f"{command}: {message}" if command else message)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KodeError(f"--option takes KEY=VALUE, got '{pair}'")
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def _cmd_models(args) -> int:
    import zoo

    names = zoo.list_models(args.pattern)
    if not names:
        raise KodeError(f"no model matches '{args.pattern}'; see `kode models`")
    for name in names:
        entry = zoo.get_entry(name)
        print(f"{name:24s} {entry.family:16s} {entry.defaults.get('layout', ''):9s} "
              f"depth {entry.defaults.get('depth')}")
    return 0


def _trial_settings(args) -> dict:
    """The settings of :func:`_add_trial_arguments`' options (train, finetune and tune)."""
    return dict(
        guard_tolerance=args.guard_tolerance, guard_every=args.guard_every,
        on_inaccurate=args.on_inaccurate, strategy=args.strategy, devices=args.devices,
        connect_timeout=args.connect_timeout, tpu=args.tpu, precision=args.precision,
        sync_batchnorm=args.sync_batchnorm, deterministic=args.deterministic,
        diagnostics=not args.no_diagnostics, recompute=not args.no_recompute,
        jit_compile=args.jit_compile, image_size=args.image_size,
        validation_split=args.validation_split, skip_bad_images=args.skip_bad_images,
    )


def train_settings(args):
    """The :class:`~kode.training.settings.TrainSettings` that ``kode train``'s options
    describe."""
    from kode.training.settings import TrainSettings

    return TrainSettings(
        args.model, args.dataset, epochs=args.epochs, batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr,
        schedule=args.schedule, weight_decay=args.weight_decay, decay_lm_k=args.decay_lm_k,
        seed=args.seed, logdir=args.logdir, export_dir=args.export, data_dir=args.data_dir,
        manual_dir=args.manual_dir, model_options=_model_options(args), gradient=args.gradient,
        verbose=1 if sys.stdout.isatty() else 2, resume=not args.no_resume,
        **_trial_settings(args),
    )


def _cmd_train(args) -> int:
    from kode.training.pipeline import TrainingPipeline

    settings = train_settings(args).resolve()  # bad values fail before any file is written
    result = TrainingPipeline(settings).run()
    _print_outcome(result.test_metrics, result.logdir, result.logdir, result.export,
                   f"model: {result.model_path}; metrics: {result.metrics_path}")
    return 0


def _refine_factor(text: str) -> int | str:
    """``--refine``: a positive integer or ``auto`` (argparse reports the error, one line)."""
    if text == "auto":
        return text
    try:
        factor = int(text)
    except ValueError:
        factor = 0
    if factor < 1:
        raise argparse.ArgumentTypeError(
            f"refinement factor must be a positive integer or 'auto', got '{text}'")
    return factor


def _cmd_finetune(args) -> int:
    from kode.training.finetune import FinetunePipeline, run_name, settings_from

    args.model = args.name or run_name(args.source)
    args.option, args.step_size = None, None  # the source fixes the architecture
    freeze = int(args.freeze) if args.freeze.isdigit() else args.freeze
    settings = settings_from(
        train_settings(args), source=args.source, weights=args.weights, refine=args.refine,
        freeze=freeze, input_size=args.input_size,
    ).resolve()
    result = FinetunePipeline(settings).run()
    _print_outcome(result.test_metrics, result.logdir, result.logdir, result.export,
                   f"model: {result.model_path}; metrics: {result.metrics_path}")
    return 0


def _print_outcome(test_metrics: dict, logdir: str, tensorboard_dir: str, export,
                   extra: str | None = None) -> None:
    """The end of a run: test metrics, where the logs are, the verified export."""
    print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    print(f"logs: {logdir} (tensorboard --logdir {tensorboard_dir})")
    if extra:
        print(extra)
    if export is not None:
        _print_export(export)


def _cmd_tune(args) -> int:
    from kode.training.tuning import tune

    depths = None
    if args.depths:
        try:
            depths = [int(d) for d in args.depths.split(",")]
        except ValueError:
            raise KodeError(f"--depths takes integers separated by commas: {args.depths!r}") \
                from None
    result = tune(
        args.family, args.dataset, tuner=args.tuner, max_trials=args.max_trials,
        epochs=args.epochs, batch_size=args.batch_size, depths=depths,
        validation_fraction=args.validation_fraction, seed=args.seed, directory=args.logdir,
        export_dir=args.export, data_dir=args.data_dir, overwrite=args.overwrite,
        verbose=1 if sys.stdout.isatty() else 2,
        **_trial_settings(args),
    )
    print(f"best trial {result.best_trial_id}: val_accuracy {result.best_score:.4f}")
    print("best hyper-parameters: " + json.dumps(result.best_hyperparameters, sort_keys=True))
    _print_outcome(result.test_metrics, result.directory, result.tensorboard_dir, result.export)
    return 0


def _model_options(args) -> dict:
    options = _parse_options(args.option)
    if args.step_size is not None:
        try:
            options["step_size"] = "ode" if args.step_size == "ode" else float(args.step_size)
        except ValueError:
            raise KodeError(f"--step-size takes a number or 'ode': {args.step_size!r}") from None
    return options


def _cmd_check_gradients(args) -> int:
    from kode.tools.guard import check_tolerance
    from kode.training.gradient_check import check_zoo_gradients

    tolerance = check_tolerance(args.tolerance)
    report = check_zoo_gradients(args.model, args.dataset, batch_size=args.batch_size,
                                 data_dir=args.data_dir, weights=args.weights,
                                 model_options=_model_options(args))
    print(report.format())
    bad = report.inaccurate(tolerance)
    if bad:
        print(f"inaccurate above tolerance {tolerance:g}: {', '.join(s.name for s in bad)} "
              "(use gradient 'checkpoint', or step_size 'ode' with smooth weights)")
        return 1
    print(f"all stages within tolerance {tolerance:g}")
    return 0


def _print_export(export) -> None:
    print(f"exported SavedModel to {export.path} (version {export.version}); "
          f"max |SavedModel − Keras| = {export.max_abs_diff:.3g}")


def _cmd_export(args) -> int:
    from kode.serving.export import export_keras_file

    _print_export(export_keras_file(args.model, args.export_dir, name=args.name,
                                    version=args.version))
    return 0


def _cmd_predict(args) -> int:
    from kode.serving.predict import predict_files

    for p in predict_files(args.savedmodel, args.files):
        print(f"{p.file}\t{p.class_name}\t{p.probability:.4f}")
    return 0


def _cmd_reproduce(arguments: list[str]) -> int:
    """The paper experiments live in a source checkout (``benchmarks/reproduce``), not in the
    installed package: run them there as ``python -m benchmarks.reproduce`` in a child process
    (the library itself never imports the benchmarks)."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "reproduce" / "__main__.py").is_file():
        raise KodeError("kode reproduce runs from a source checkout of kode (it needs "
                        "benchmarks/reproduce/); install with pip install -e .")
    path = os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, "-m", "benchmarks.reproduce", *arguments],
                           env={**os.environ, "PYTHONPATH": path})


_DATASET_HELP = ("digits (embedded), mnist, cifar10, cifar100 or imagenet2012 (any case); a "
                 "folder of images, one sub-folder per class (or train/ and test/ with that "
                 "layout inside); or tfds:NAME[/CONFIG], prepared in --data-dir")
_DATA_DIR_HELP = "tensorflow-datasets folder holding the prepared dataset"


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training run, shared by `kode train` and `kode finetune`."""
    parser.add_argument("--dataset", default="digits", help=_DATASET_HELP)
    parser.add_argument("--epochs", type=int, help="epochs (default: the dataset's recipe)")
    parser.add_argument("--batch-size", type=int,
                       help="global batch size, all replicas (default: the recipe)")
    parser.add_argument("--steps-per-epoch", type=int, metavar="N",
                       help="optimizer steps per epoch, as Keras' fit(steps_per_epoch=N): "
                       "epochs take the next N batches of the reshuffled passes over the "
                       "training set (default: one pass)")
    parser.add_argument("--lr", type=float,
                       help="initial learning rate, finite and > 0 (default: the recipe)")
    parser.add_argument("--schedule", choices=["step", "cosine", "constant"],
                       help="learning-rate schedule (step: ÷10 at 50%% and 75%%)")
    parser.add_argument("--weight-decay", type=float,
                       help="decoupled weight decay, finite and >= 0 (default: the recipe)")
    parser.add_argument("--decay-lm-k", action="store_true",
                       help="apply weight decay to LM's k_n too (the authors' code does)")
    parser.add_argument("--seed", type=int, default=0,
                       help="seed of initialization, shuffling and augmentation")
    parser.add_argument("--logdir", help="run folder: logs, checkpoints, model.keras, metrics.json "
                       "(default: runs/MODEL-DATASET-TIME); rerun to resume")
    parser.add_argument("--export", metavar="DIR", help="export a SavedModel under DIR")
    parser.add_argument("--data-dir", help=_DATA_DIR_HELP)
    parser.add_argument("--manual-dir",
                       help="imagenet2012: folder with the manually downloaded tar files")
    parser.add_argument("--gradient", default="backprop",
                       choices=["backprop", "checkpoint", "adjoint"],
                       help="how stages are differentiated (adjoint: memory-free)")
    parser.add_argument("--no-resume", action="store_true",
                       help="ignore checkpoints of an interrupted run in --logdir")
    _add_trial_arguments(parser)


def _add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every trained model takes, `kode tune`'s trials included: the gradient
    guard, the strategy, precision and diagnostics."""
    parser.add_argument("--guard-tolerance", type=float, default=0.05,
                       help="largest accepted relative adjoint gradient error")
    parser.add_argument("--no-recompute", action="store_true",
                       help="with --gradient checkpoint/adjoint: let the layers outside the "
                       "stages (stem, transitions, head) store their activations instead of "
                       "recomputing them in the backward")
    parser.add_argument("--guard-every", type=int, metavar="K",
                       help="re-check the adjoint every K epochs (default: at start only)")
    parser.add_argument("--on-inaccurate", choices=["stop", "fallback"], default="stop",
                       help="above tolerance: stop, or switch those stages to checkpoint")
    parser.add_argument("--strategy", default="default",
                       choices=["default", "mirrored", "multiworker", "tpu"],
                       help="tf.distribute strategy (multiworker reads TF_CONFIG)")
    parser.add_argument("--devices", type=int, metavar="N",
                       help="mirrored: split the CPU into N logical devices (replicas)")
    parser.add_argument("--connect-timeout", type=float, metavar="S",
                       help="multiworker: seconds to wait for the other workers (default 60)")
    parser.add_argument("--tpu", metavar="NAME", help="tpu: TPU name or grpc://HOST:PORT")
    parser.add_argument("--precision", default="float32",
                       choices=["float32", "mixed_bfloat16", "mixed_float16"],
                       help="Keras dtype policy (mixed_float16 adds dynamic loss scaling)")
    parser.add_argument("--sync-batchnorm", action="store_true",
                       help="BatchNorm statistics over the global batch (all replicas)")
    parser.add_argument("--deterministic", action="store_true",
                       help="deterministic TensorFlow ops (bitwise reproducible runs/resumes)")
    parser.add_argument("--jit-compile", choices=["auto", "on", "off"], default="auto",
                       help="XLA for the train step: auto = on a GPU/TPU with backprop (as "
                       "Keras' jit_compile='auto'), off on a CPU and for checkpoint/adjoint")
    parser.add_argument("--no-diagnostics", action="store_true",
                       help="skip the TensorBoard diagnostics (k_n, residual sizes, images/s)")
    parser.add_argument("--image-size", type=int, metavar="S",
                       help="folders and tfds:NAME: resize images to S x S (folders: default "
                       "the model's input size, 32 for the CIFAR layout)")
    parser.add_argument("--validation-split", type=float, default=0.2, metavar="F",
                       help="folders without test/: part of each class held out as the test "
                       "split (seeded by --seed; default 0.2)")
    parser.add_argument("--skip-bad-images", action="store_true",
                       help="folders: skip unreadable images (and say how many) instead of "
                       "refusing the folder")


def build_parser() -> argparse.ArgumentParser:
    from kode import __version__

    parser = _Parser(prog="kode", description="Residual networks as ODE integrators.")
    parser.add_argument("--version", action="version", version=f"kode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="list the zoo")
    models.add_argument("pattern", nargs="?", default="*",
                        help="shell-style name pattern, e.g. 'lm_resnet*' (default: all)")
    models.set_defaults(run=_cmd_models)

    train = sub.add_parser("train", help="train a zoo model")
    train.add_argument("model", help="a zoo model name (see `kode models`)")
    train.add_argument("--step-size", help="h: a number (1 = classic) or 'ode' for h = 1/N")
    train.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="builder argument, e.g. width_multiplier=0.5 (repeatable)")
    _add_run_arguments(train)
    train.set_defaults(run=_cmd_train)

    finetune = sub.add_parser(
        "finetune", help="fine-tune a pretrained network (.keras, zoo or keras.applications)")
    finetune.add_argument("source", help="a .keras file, a zoo model name (with --weights) or "
                          "a keras.applications ResNet: ResNet50V2/101V2/152V2, "
                          "ResNet50/101/152")
    finetune.add_argument("--weights", metavar="FILE|imagenet",
                          help="weights of a zoo or keras.applications source ('imagenet' "
                          "downloads keras.applications' ImageNet weights)")
    finetune.add_argument("--refine", type=_refine_factor, default=1, metavar="M|auto",
                          help="untie every residual step into M steps of h/M (default 1); "
                          "auto: the smallest M in 1, 2, 4, 8, 16 whose adjoint gradient "
                          "error (guard) is within --guard-tolerance")
    finetune.add_argument("--freeze", default="0", metavar="stem|K",
                          help="freeze the stem, or the stem and the first K stages")
    finetune.add_argument("--input-size", type=int, metavar="S",
                          help="input side for the source (keras.applications default 224)")
    finetune.add_argument("--name", help="run name (logdir, export; default finetune_SOURCE)")
    _add_run_arguments(finetune)
    finetune.set_defaults(run=_cmd_finetune)

    tune = sub.add_parser("tune", help="search hyper-parameters with KerasTuner")
    tune.add_argument("family", help="a zoo family (resnet, lm_resnet, ...), a comma-separated "
                      "list of families, or 'all'")
    tune.add_argument("--dataset", default="digits", help=_DATASET_HELP)
    tune.add_argument("--data-dir", help=_DATA_DIR_HELP)
    tune.add_argument("--tuner", choices=["random", "bayesian", "hyperband"], default="random",
                      help="KerasTuner search algorithm")
    tune.add_argument("--max-trials", type=int, default=10, help="at most this many trials")
    tune.add_argument("--epochs", type=int, default=10,
                      help="epochs per trial (hyperband: the most epochs of a trial)")
    tune.add_argument("--batch-size", type=int, help="batch size (default: the recipe)")
    tune.add_argument("--depths", metavar="D,D,...", help="depths to search, e.g. 8,14,20")
    tune.add_argument("--validation-fraction", type=float, default=0.1,
                      help="part of the train split held out to score trials")
    tune.add_argument("--seed", type=int, default=0, help="seed of the search and the split")
    tune.add_argument("--logdir", help="tuner directory (trials, TensorBoard logs)")
    tune.add_argument("--export", metavar="DIR", default="saved_models",
                      help="export the best model as a SavedModel under DIR")
    tune.add_argument("--overwrite", action="store_true",
                      help="start the search over instead of resuming it")
    _add_trial_arguments(tune)
    tune.set_defaults(run=_cmd_tune)

    check = sub.add_parser("check-gradients",
                           help="adjoint vs backprop gradient error per stage, on one batch")
    check.add_argument("model", help="a zoo model name (see `kode models`)")
    check.add_argument("--dataset", default="digits", help=_DATASET_HELP)
    check.add_argument("--data-dir", help=_DATA_DIR_HELP)
    check.add_argument("--batch-size", type=int, default=32,
                       help="examples in the batch the gradients are compared on")
    check.add_argument("--step-size", help="h: a number or 'ode'")
    check.add_argument("--weights", help="a .keras or .weights.h5 file to check instead of init")
    check.add_argument("--tolerance", type=float, default=0.05,
                       help="largest accepted relative gradient error per stage")
    check.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="builder argument, e.g. width_multiplier=0.5 (repeatable)")
    check.set_defaults(run=_cmd_check_gradients)

    export = sub.add_parser("export", help="export a trained .keras model as a SavedModel")
    export.add_argument("model", help="a .keras file written by `kode train`")
    export.add_argument("--export-dir", default="saved_models",
                        help="SavedModels go to EXPORT_DIR/NAME/VERSION")
    export.add_argument("--name", help="model name in the export path (default: from kode.json)")
    export.add_argument("--version", type=int,
                        help="version number (default: the next free one; never overwrites)")
    export.set_defaults(run=_cmd_export)

    predict = sub.add_parser("predict", help="classify image files with an exported SavedModel")
    predict.add_argument("savedmodel", help="an exported SavedModel folder")
    predict.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.set_defaults(run=_cmd_predict)

    # Listed for `kode --help`; main() hands its arguments to benchmarks/reproduce/runner.py,
    # whose parser is the one definition for both entry points.
    sub.add_parser("reproduce", add_help=False,
                   help="run the papers' experiments, regenerate docs/results.md ([--quick])")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = None
    try:
        if argv[:1] == ["reproduce"]:
            return _cmd_reproduce(argv[1:])
        parser = build_parser()
        if not argv:
            parser.print_usage(sys.stderr)
            print(error_line("a command is required (kode --help lists them)"), file=sys.stderr)
            return EXIT_USAGE
        args = parser.parse_args(argv)
        command = args.command
        if command != "models":
            from kode.distribute.strategy import discover_devices_quietly

            # TensorFlow's C++ start-up lines (no GPU: "E0000 ... failed call to cuInit")
            # must not stand before kode's one-line messages.
            discover_devices_quietly()
        return args.run(args)
    except KodeError as err:
        print(error_line(err), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = ("; run the same command again to resume from the last completed epoch"
                if command in ("train", "finetune", "tune") else "")
        print(f"kode: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
