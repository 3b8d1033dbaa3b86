"""Command line: python -m training {train,select,rank,report} (see --help of each).

  train   train one configuration and export the serving artifact + model card
  select  the paper's model selection: Stage 1 over the bases, Stage 2 over optimizers x losses
  rank    rank the finished candidates of a stage with the paper's score (OUT/stage<S>.csv)
  report  Markdown report with PNG plots, of a selection (--out) or of one train run (--run)
  compare train a (small) network on one split, per-task validation AUC every epoch; --leave-out S
  paired  two compare runs on the same photos: per-task AUC difference with a paired interval
  evaluate  metrics of a model artifact per task, source and class, with a shortcut probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

from aisight.artifact import DEFAULT_MODEL_DIR
from training.config import TrainConfig


def default_cache() -> str:
    """Where decoded 128x128 arrays are cached: $AISIGHT_CACHE, else .cache/arrays, else under $TMPDIR
    (containers run with a read-only working directory)."""
    if os.environ.get("AISIGHT_CACHE"):
        return os.environ["AISIGHT_CACHE"]
    if os.access(".", os.W_OK):
        return ".cache/arrays"
    return os.path.join(tempfile.gettempdir(), "aisight-arrays")


def _add_config_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Expose every TrainConfig field as --option (None: keep the config file's or default value)."""
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name == "bn_momentum":
                kind = float
            p.add_argument(flag, dest=f.name, type=kind, default=None)


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or ``base``), then the --config file, then command-line options."""
    cfg = base or TrainConfig()
    if args.config:
        TrainConfig.from_file(args.config)  # refuses unknown options
        cfg = replace(cfg, **json.loads(Path(args.config).read_text()))
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    return cfg


def _pair(text: str) -> tuple[int, int]:
    try:
        b, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,C (two integers), got {text!r}") from None
    return b, c


def _add_data_options(p: argparse.ArgumentParser, recipe_default: str | None) -> None:
    p.add_argument("--data", required=True, action="append",
                   help="folder (manifest.csv or class-per-folder), manifest CSV, or KIND=PATH,... "
                        "(eyepacs=trainLabels.csv, origa=labels.csv, manifest=..., folder=...); several "
                        "folders: repeat --data or join with commas (patients are grouped across folders)")
    p.add_argument("--cache", default=None, help="cache of decoded 128x128 arrays (default .cache/arrays)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig options")
    p.add_argument("--protocol", choices=("leakfree", "paper"), default="leakfree",
                   help="leakfree (default): split by patient, then augment the training part; paper: augment, "
                        "then split by image (the published leak)")
    p.add_argument("--recipe", choices=("paper", "none"), default=recipe_default,
                   help="the paper's sampling + augmentation, or none (every photo once)"
                        + ("; default none, or paper with --protocol paper" if recipe_default is None else ""))
    p.add_argument("--limit", type=int, default=None, help="use N photos (label mix kept): for tiny runs")
    p.add_argument("--eyepacs-healthy", type=int, default=3000, help="EyePACS healthy photos sampled (3000)")
    p.add_argument("--eyepacs-dr", type=int, default=987, help="EyePACS DR photos sampled (987)")
    p.add_argument("--dr-copies", type=int, default=2, help="extra copies of each EyePACS DR photo (2)")
    p.add_argument("--aug-healthy", type=_pair, default=(3, 1), metavar="B,C",
                   help="orientations/zooms b and noise configurations c for healthy non-EyePACS photos (3,1)")
    p.add_argument("--aug-diseased", type=_pair, default=(4, 3), metavar="B,C",
                   help="b and c for diseased non-EyePACS photos (4,3)")


def recipe_from_args(args: argparse.Namespace):
    """The Recipe of the command line, or None for train's plain patient split."""
    from training.recipe import Recipe

    name = args.recipe or ("paper" if args.protocol == "paper" else None)
    if name is None:
        return None
    return Recipe(name=name, eyepacs_healthy=args.eyepacs_healthy, eyepacs_diseased=args.eyepacs_dr,
                  dr_copies=args.dr_copies, aug_healthy=args.aug_healthy, aug_diseased=args.aug_diseased)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one configuration and export the serving artifact + model card")
    _add_data_options(p, recipe_default=None)
    p.add_argument("--out", required=True, help="folder for model.keras + model_card.json")
    p.add_argument("--run-dir", default=None, help="folder for split lists, history, predictions, checkpoint/ "
                                                   "(default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from RUN_DIR/checkpoint")
    _add_config_options(p)

    p = sub.add_parser("select", help="Stage 1 over the bases, then Stage 2 on the winner (resumable)")
    _add_data_options(p, recipe_default="paper")
    p.add_argument("--out", required=True, help="folder for stage1/, stage2/, stageN.csv, report.md")
    p.add_argument("--archs", default=None, help="Stage 1 bases, A,B,... (default: the paper's 17; TinyNet for tests)")
    p.add_argument("--stage", choices=("1", "2", "baseline"), default=None,
                   help="run one stage only (default: Stage 1, rank, Stage 2, rank, baseline, report)")
    p.add_argument("--index", type=int, default=None, help="with --stage: run only candidate I of that stage")
    p.add_argument("--optimizers", default=None, help="Stage 2 optimizers (default rmsprop,adam,adagrad)")
    p.add_argument("--losses", default=None, help="Stage 2 losses (default cce,mse,mae)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the random-init baseline (reused from Stage 1 when it is one already)")
    p.add_argument("--baseline-arch", default="Xception", help="architecture of the baseline (Xception)")
    # --arch makes no sense here (--archs); every other TrainConfig field overrides the Stage defaults.
    _add_config_options(p, skip=("arch",))

    p = sub.add_parser("compare", help="train on one patient split and write per-task validation AUCs "
                                       "(method comparisons with a small network; --leave-out for a new source)")
    _add_data_options(p, recipe_default=None)
    p.add_argument("--out", required=True, help="folder for result.json, history.csv, checkpoint/")
    p.add_argument("--leave-out", default=None, help="train without this source; evaluate on all of its photos")
    p.add_argument("--train-sources", default=None, help="train on these sources only (A,B)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint after a stop")
    _add_config_options(p)

    p = sub.add_parser("paired", help="two compare runs (or evaluations) on the same photos: per-task AUCs "
                                      "and the paired difference with a bootstrap interval")
    p.add_argument("--run", required=True, help="a compare or evaluate --out folder (the method tried)")
    p.add_argument("--baseline", required=True, help="a compare or evaluate --out folder (the baseline)")
    p.add_argument("--out", default=None, help="also write paired.md and paired.json here")

    p = sub.add_parser("resolution", help="the same small network at several input sizes within one collection "
                                          "(is 128 px the limit?): test AUCs side by side")
    p.add_argument("--data", required=True, action="append", help="graded EyePACS photos (eyepacs-256)")
    p.add_argument("--out", required=True, help="folder for resolution.md and resolution.json")
    p.add_argument("--sizes", default="128,256", help="input sides in pixels (128,256)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--epoch-size", type=int, default=2000, help="label-balanced photos drawn per epoch")
    p.add_argument("--cache", default=None, help="cache of decoded arrays (default .cache/arrays)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="ProxyNet", help="ProxyNet (default) or Xception, from scratch")

    p = sub.add_parser("evaluate", help="per-task, per-source and per-class metrics of a model artifact on photos "
                                        "of patients it did not train on (Markdown + JSON)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="artifact folder (default: the bundled model)")
    p.add_argument("--data", required=True, action="append", help="data folders (repeat or join with commas)")
    p.add_argument("--out", required=True, help="folder for evaluation.md, evaluation.json, predictions.npz")
    p.add_argument("--cache", default=None, help="cache of decoded arrays (default .cache/arrays)")
    p.add_argument("--exclude-seen-by", action="append", default=[], metavar="DIR",
                   help="also leave out the training and validation patients of this artifact (repeat): "
                        "compare two models on the same photos")
    p.add_argument("--all-photos", action="store_true",
                   help="also photos of patients the model trained on (not a fair measure; for inspection)")
    p.add_argument("--write-card", action="store_true",
                   help="record the per-task figures in the model card (shown on the result page)")

    p = sub.add_parser("rank", help="rank the finished candidates of a stage and write OUT/stage<S>.csv")
    p.add_argument("--out", required=True)
    p.add_argument("--stage", choices=("1", "2"), required=True)

    p = sub.add_parser("export-openvino", help="add the OpenVINO IR (the app's CPU fast path) to a model artifact")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="artifact with model.keras (default: bundled)")
    p.add_argument("--int8", action="store_true",
                   help="also quantise to int8 with NNCF (model_int8.xml) and record its per-source check in the card")
    p.add_argument("--data", action="append", default=[],
                   help="with --int8: data folders; seen patients calibrate, unseen ones check")
    p.add_argument("--cache", default=None, help="cache of decoded arrays (default .cache/arrays)")
    p.add_argument("--calibration", type=int, default=300, help="with --int8: calibration photos (300)")
    p.add_argument("--accuracy-control", action="store_true",
                   help="with --int8: keep in float32 the layers int8 hurts most, judged on validation patients")

    p = sub.add_parser("export-reviewed", help="the clinician-reviewed photos of the app's database (DATABASE_URL) "
                       "as a data folder (manifest.csv + photos) that train --data accepts")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--database-url", default=None, help="default: DATABASE_URL, else the SQLite file under var/")

    p = sub.add_parser("report", help="Markdown report + PNG plots of a selection (--out) or a train run (--run)")
    p.add_argument("--out", default=None, help="selection folder (report.md goes there), or with --run the "
                                               "report's folder")
    p.add_argument("--run", default=None, help="a train run folder (history.csv, predictions.npz, metrics.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (FileNotFoundError, IndexError, ValueError) as exc:  # DatasetError is a ValueError
        if os.environ.get("AISIGHT_DEBUG"):
            raise
        print(f"python -m training {args.command}: error: {exc} (AISIGHT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if isinstance(getattr(args, "data", None), list):  # --data given once or more: one comma-joined spec
        args.data = ",".join(args.data)
    if args.command == "train":
        from training.train import train_and_export

        cfg = config_from_args(args)
        run_dir = args.run_dir or f"runs/{cfg.name}-{cfg.arch.lower()}"
        train_and_export(cfg, args.data, args.out, run_dir, cache_dir=args.cache or default_cache(),
                         protocol=args.protocol, recipe=recipe_from_args(args), limit=args.limit,
                         resume=args.resume)
        return 0
    if args.command == "compare":
        from training.proxy import run_comparison

        cfg = config_from_args(args)
        run_comparison(cfg, args.data, args.out, args.cache or default_cache(), leave_out=args.leave_out,
                       train_sources=tuple(args.train_sources.split(",")) if args.train_sources else (),
                       resume=args.resume)
        return 0
    if args.command == "paired":
        from training.proxy import paired, paired_markdown

        result = paired(args.run, args.baseline)
        text = paired_markdown(result, args.run, args.baseline)
        print(text, end="")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "paired.md").write_text(text)
            (Path(args.out) / "paired.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.command == "resolution":
        from training.resolution import run_resolution

        run_resolution(args.data, args.out, [int(v) for v in args.sizes.split(",")], epochs=args.epochs,
                       epoch_size=args.epoch_size, cache=args.cache or default_cache(), seed=args.seed,
                       arch=args.arch)
        return 0
    if args.command == "evaluate":
        from training.evaluate import evaluate_model

        evaluate_model(args.model, args.data, args.out, args.cache or default_cache(), all_photos=args.all_photos,
                       write_card=args.write_card, exclude_seen_by=args.exclude_seen_by)
        return 0
    if args.command == "select":
        from training.stages import STAGE2_LOSSES, STAGE2_OPTIMIZERS, Selection, parse_list, select, stage_defaults

        if args.index is not None and args.stage is None:
            parser.error("--index needs --stage")
        sel = Selection(
            data=args.data, out=Path(args.out), base=config_from_args(args, stage_defaults()),
            recipe=recipe_from_args(args), protocol=args.protocol, limit=args.limit,
            cache_dir=args.cache or default_cache(),
            archs=args.archs.split(",") if args.archs else None,
            optimizers=parse_list(args.optimizers, STAGE2_OPTIMIZERS, "optimizer"),
            losses=parse_list(args.losses, STAGE2_LOSSES, "loss"), baseline_arch=args.baseline_arch,
        )
        failed = select(sel, args.stage, args.index, baseline=args.baseline)
        return 1 if failed else 0
    if args.command == "rank":
        from training.stages import rank_stage

        rank_stage(args.out, args.stage)
        return 0
    if args.command == "export-openvino":
        from aisight import ov_backend
        from aisight.artifact import ArtifactError

        if args.int8 and not args.data:
            parser.error("export-openvino --int8 needs --data (photos to calibrate on and to check with)")
        try:
            info = ov_backend.export_dir(args.model)
        except (ArtifactError, ImportError) as exc:
            print(f"python -m training export-openvino: error: {exc}", file=sys.stderr)
            return 2
        print(f"{Path(args.model) / ov_backend.IR_FILE}: {json.dumps(info)}")
        if args.int8:
            from training.quantize import quantize_int8

            record = quantize_int8(args.model, args.data, args.cache or default_cache(), args.calibration,
                                   accuracy_control=args.accuracy_control)
            print(f"{Path(args.model) / ov_backend.INT8_IR_FILE}: {json.dumps(record)}")
        return 0
    if args.command == "export-reviewed":
        from training.reviewed import export_reviewed

        print(json.dumps(export_reviewed(args.out, args.database_url)))
        return 0
    if args.command == "report":
        from training.report import write_run_report, write_selection_report

        if args.run:
            write_run_report(args.run, args.out)
        elif args.out:
            write_selection_report(args.out)
        else:
            parser.error("report needs --out (a selection) or --run (a train run)")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
