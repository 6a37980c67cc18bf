"""``pipeline("image-text-to-text")`` (and its alias ``"image-to-text"``) for an OFA folder.

OFA's text is a question to the encoder (the caption prompt), not the start of the answer, so the
pipeline answers with the caption alone: exactly ``generate`` + ``processor.batch_decode``. With
no text, the processor's caption prompt is used. ``config.json`` names this class in
``custom_pipelines`` for both task names, so ``pipeline(task, model=folder,
trust_remote_code=True)`` builds it.

Self-contained (transformers only): ofaconv copies this file into every converted folder.
"""

from __future__ import annotations

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline, ReturnType


class OFAImageTextToTextPipeline(ImageTextToTextPipeline):
    """transformers' image-text-to-text pipeline with OFA's reading of the prompt.

    ``pipe(images)`` captions with the checkpoint's prompt; ``pipe(images, text=question)`` asks
    another one. Each result is ``{"input_text": prompt, "generated_text": caption}``;
    ``return_full_text=True`` prepends the prompt as transformers does, ``return_tensors=True``
    gives the generated ids. Generation settings come from the folder's ``generation_config.json``
    unless passed (``generate_kwargs``, ``max_new_tokens``).
    """

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and text is None:
            text = self.processor.prompt
        return super().__call__(images, text=text, **kwargs)

    def postprocess(self, model_outputs, return_type=ReturnType.NEW_TEXT, **kwargs):
        if return_type == ReturnType.TENSORS:
            return super().postprocess(model_outputs, return_type=return_type, **kwargs)
        prompts = model_outputs["prompt_text"]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sequences = model_outputs["generated_sequence"]
        if sequences.ndim == 3:
            sequences = sequences.flatten(0, 1)
        captions = self.processor.batch_decode(sequences, skip_special_tokens=True)
        per_prompt = len(captions) // len(prompts)
        records = []
        for i, caption in enumerate(captions):
            prompt = prompts[i // per_prompt]
            text = prompt + caption if return_type == ReturnType.FULL_TEXT else caption
            records.append({"input_text": prompt, "generated_text": text})
        return records


__all__ = ["OFAImageTextToTextPipeline"]
