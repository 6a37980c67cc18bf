"""Finetune converted OFA models on captions (LiT-tuning by default) with the transformers Trainer.

    from ofaconv.finetune import finetune
    result = finetune("training/ofa_muge_lit.yaml", ["training.num_train_epochs=1"])
    print(result.output_dir, result.metrics)
"""

from .recipe import Recipe, RecipeError, load_recipe
from .run import FinetuneResult, finetune

__all__ = ["finetune", "FinetuneResult", "load_recipe", "Recipe", "RecipeError"]
