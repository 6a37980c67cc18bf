"""The OFA family: fairseq OFA / OFA-CN checkpoints, their transformers model, parity and tasks."""
