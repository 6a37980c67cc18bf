"""``ofaconv finetune RECIPE.yaml [--override key=value ...] [--smoke] [--resume [CHECKPOINT]]``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="finetune a converted OFA model on captions (LiT by default) from a YAML recipe",
        description="Finetune a converted (or finetuned) OFA folder on MUGE-format or image/caption "
        "pair data. Multi-GPU: launch the same command with torchrun or accelerate launch.",
    )
    p.add_argument("recipe", help="recipe YAML (see training/)")
    p.add_argument(
        "--override", "-o", action="append", default=[], metavar="KEY=VALUE",
        help="set a recipe key (dotted, value parsed as YAML), e.g. training.learning_rate=1e-4; repeatable",
    )
    p.add_argument("--smoke", action="store_true",
                   help="run the recipe on a micro model and synthetic data for a few CPU steps")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the latest one in checkpoint_dir")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .run import finetune

    overrides = list(args.override)
    if args.resume is not None:
        overrides.append(f"resume_from_checkpoint={'true' if args.resume is True else args.resume}")
    result = finetune(args.recipe, overrides, smoke=args.smoke)
    if result.report is not None and not result.report.get("passed"):
        return 3
    return 0
