"""``ofaconv inspect CKPT``: what convert would do (variant, flags, key plan), writing nothing."""

from __future__ import annotations

import json

from .convert import DEFAULT_KEYMAP, plan_conversion, released_variant


def inspect_checkpoint(path, *, keymap: str = DEFAULT_KEYMAP, ema: bool = False) -> dict:
    from .checkpoint import infer_config, load_checkpoint, read_flags

    ckpt = load_checkpoint(path, ema=ema)
    shape = infer_config(ckpt.state_dict)
    flags = read_flags(ckpt)
    variant, family = released_variant(shape, flags)
    _, plan = plan_conversion(keymap, ckpt.state_dict, shape, flags, path)  # refuses what convert would
    return {
        "file": str(path),
        "layout": ckpt.layout,
        "variant": variant,
        "family": family,
        "config": shape,
        "flags": flags,
        "optimizer_state": ckpt.has_optimizer_state,
        "ema": ckpt.has_ema,
        "plan": plan.summary_lines(),
    }


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show the detected variant, flags and key plan of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--keymap", default=DEFAULT_KEYMAP)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    info = inspect_checkpoint(args.checkpoint, keymap=args.keymap, ema=args.ema)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"file:     {info['file']} ({info['layout']} layout)")
    print(f"variant:  {info['variant'] or 'unknown (shapes follow the OFA scheme)'}; family: {info['family'] or 'unknown'}")
    c = info["config"]
    print(f"shape:    d_model {c['d_model']}, layers {c['encoder_layers']}+{c['decoder_layers']}, "
          f"heads {c['encoder_attention_heads']}, ffn {c['encoder_ffn_dim']}, vocab {c['vocab_size']}, "
          f"resnet {c['resnet_layers']}")
    print(f"extra:    optimizer state {'present (not read)' if info['optimizer_state'] else 'absent'}, "
          f"EMA {'present' if info['ema'] else 'absent'}")
    print("flags:    " + ", ".join(f"{k}={v}" for k, v in sorted(info["flags"].items())))
    for line in info["plan"]:
        print(line)
    return 0
