"""Finetune converted OFA models on captions (LiT-tuning by default) with the transformers Trainer.

    from ofaconv.finetune import finetune
    result = finetune("training/ofa_muge_lit.yaml", ["training.num_train_epochs=1"])
    print(result.output_dir, result.metrics)

The names below resolve on first use, so that importing the command module
(``ofaconv finetune --help``) loads neither torch nor transformers.
"""

from ofaconv.core.lazy import lazy_exports

__all__ = ["finetune", "FinetuneResult", "load_recipe", "Recipe", "RecipeError"]
__getattr__ = lazy_exports(__name__, {"recipe": ["Recipe", "RecipeError", "load_recipe"],
                                      "run": ["FinetuneResult", "finetune"]})
