"""Command line: python -m training {train,...} (see --help)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from training.train import TrainConfig


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """Expose every TrainConfig field as --option (None: keep the config file's or default value)."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name == "bn_momentum":
                kind = float
            p.add_argument(flag, dest=f.name, type=kind, default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then command-line options."""
    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one configuration and export the serving artifact + model card")
    p.add_argument("--data", required=True, help="folder (manifest.csv or class-per-folder) or manifest CSV")
    p.add_argument("--out", required=True, help="folder for model.keras + model_card.json")
    p.add_argument("--run-dir", default=None, help="folder for split lists, history, predictions (default runs/<name>)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig options")
    p.add_argument("--cache", default=".cache/arrays", help="cache of decoded 128x128 arrays")
    _add_config_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from training.train import train_and_export

        cfg = config_from_args(args)
        run_dir = args.run_dir or f"runs/{cfg.name}-{cfg.arch.lower()}"
        train_and_export(cfg, args.data, args.out, run_dir, cache_dir=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
