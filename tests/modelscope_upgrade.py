"""Tiny random-weight ModelScope folders for ``ofaconv upgrade``'s parity with ModelScope itself.

``fixtures/make_modelscope_upgrade.py`` writes these folders, runs ModelScope's caption path
(``OfaPreprocessor`` + ``OfaForAllTasks``, what its image-captioning pipeline runs) and its
``OFAModel`` forward on them in the ModelScope virtualenv and records the results in
``fixtures/modelscope_upgrade.json``; ``tests/test_upgrade.py`` writes the same folders again (the
fixture records the weights' sha256), upgrades them and compares.

The folders are built like tests/modelscope_tasks.py's (same weights, vocabulary and port
config.json), with settings a default conversion would get wrong: image-position interpolation
on (ModelScope's default orig_patch_image_size, 224, below the 256 px image size), the folder's
own prompt, ImageNet mean/std and generator settings far from the family's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import modelscope_tasks as tasks

CASES = {
    "caption_cn_interpolated": {
        "task": "image-captioning", "language": "zh", "seed": 11,
        # config.json: interpolate_position on, orig_patch_image_size absent (ModelScope: 224)
        "config": {"interpolate_position": True, "orig_patch_image_size": None},
        "model": {"patch_image_size": 256, "prompt": "图片描述了什么?", "imagenet_default_mean_and_std": True,
                  "beam_search": {"beam_size": 3, "max_len_b": 7, "min_len": 2, "no_repeat_ngram_size": 2,
                                  "len_penalty": 0.9}},
    },
}


def write_upgrade_folder(folder: Path, name: str) -> Path:
    """The ModelScope folder of case ``name`` (random weights from the case's seed)."""
    import torch

    case = CASES[name]
    fam = "en" if case["language"] == "en" else "cn"
    folder.mkdir(parents=True, exist_ok=True)
    state, shape = tasks._port_state(tasks.VARIANTS[fam], case["seed"])
    torch.save(state, folder / "pytorch_model.bin")
    config = tasks._port_config(shape, case["model"]["patch_image_size"])
    for key, value in case["config"].items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config.pop("patch_image_size", None)  # ModelScope's OFAConfig has none; configuration.json says it
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    configuration = {"framework": "pytorch", "task": case["task"],
                     "model": {"type": "ofa", "language": case["language"], **case["model"]},
                     "pipeline": {"type": case["task"]}, "preprocessor": {}}
    (folder / "configuration.json").write_text(json.dumps(configuration, indent=2, ensure_ascii=False),
                                               encoding="utf-8")
    tasks._write_vocab(folder, fam)
    return folder


write_images = tasks.write_images
weights_sha256 = tasks.weights_sha256
