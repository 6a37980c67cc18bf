"""OFA tasks (caption, VQA, visual grounding, image-text matching, OCR) as ``mappings/ofa/tasks.yaml``
defines them: one mechanism that builds the prompt, prepares the image, decodes and post-processes
the way the task's entry says, as OFA-Sys/OFA and ModelScope's OFA task pipelines do.

``TaskRunner(model, processor, task, config)`` runs one task on PIL images; its
:class:`TaskInputs` (no model: it runs in the catalog's DataLoader workers) turns an (image, text)
pair into model inputs. ``predict`` (the command and ``ofaconv.predict``) feeds them through a
catalog run. Nothing here knows a task by name: every difference is a field of the YAML entry.
"""

from __future__ import annotations

import functools
import math
import re
import string
from dataclasses import dataclass
from importlib.resources import files
from typing import Optional

import yaml

from ofaconv.core.errors import OfaconvError

TASKS_FILE = "ofaconv/mappings/ofa/tasks.yaml"


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    data = yaml.safe_load(files("ofaconv.mappings").joinpath("ofa/tasks.yaml").read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema") != "ofaconv/tasks@1":
        raise OfaconvError("unsupported schema (expected ofaconv/tasks@1)", path=TASKS_FILE)
    return data


def task_names() -> list[str]:
    return list(_load()["tasks"])


def task_spec(name: str) -> dict:
    tasks = _load()["tasks"]
    if name not in tasks:
        raise OfaconvError(f"unknown task {name!r}; choose from {', '.join(tasks)}")
    return tasks[name]


def folder_task(config: dict) -> str:
    """The task a converted folder was finetuned for (config.json ``task``; caption when absent)."""
    task = config.get("task") or "caption"
    if not isinstance(task, str) or task not in _load()["tasks"]:
        raise OfaconvError(f"names the task {task!r}, which ofaconv does not know (known: {', '.join(task_names())})",
                           path="config.json", key="task")
    return task


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def clean_text(text: str, rule: Optional[str]) -> str:
    """OFA's ``pre_caption`` / ``pre_question`` (no truncation)."""
    if rule is None:
        return text
    text = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    if rule == "caption":
        text = text.replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    if rule == "question" and not text.endswith("?"):
        text += "?"
    return text


class AnswerTrie:
    """Token sequences ``[bos] + answer + [eos]``; ``next(prefix)`` lists the ids that continue ``prefix``."""

    def __init__(self):
        self.root: dict = {}

    def insert(self, ids: list[int]) -> None:
        node = self.root
        for token in ids:
            node = node.setdefault(token, {})

    def next(self, prefix: list[int]) -> list[int]:
        node = self.root
        for token in prefix:
            node = node.get(token)
            if node is None:
                return []
        return list(node)


def read_answers(path) -> list[str]:
    """An answer list: a JSON list, a JSON object (its keys, ModelScope's ans2label.json) or one answer per line."""
    import json

    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise OfaconvError("no such answer list file", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OfaconvError(f"cannot read the answer list ({getattr(exc, 'strerror', None) or exc}); give a UTF-8 "
                           "text file with one answer per line, or a JSON list", path=path) from None
    answers = None
    if text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            answers = list(data)
        elif isinstance(data, list):
            answers = data
    if answers is None:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise OfaconvError("holds no answers (expected one answer per line, or a JSON list of strings)", path=path)
    return answers


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _ocr_pad(image, size: int, min_side: int):
    """ModelScope's ``ocr_resize`` (not the document mode): the longer side to ``size``, the other
    scaled (at least ``min_side``), centred and padded to ``size`` x ``size`` with edge pixels."""
    import numpy as np
    from PIL import Image

    width, height = image.size
    if width >= height:
        new_w, new_h = max(min_side, size), max(min_side, int(size * (height / width)))
        top = (size - new_h) // 2
        pad = ((top, size - new_h - top), (0, 0))
    else:
        new_h, new_w = max(min_side, size), max(min_side, int(size * (width / height)))
        left = (size - new_w) // 2
        pad = ((0, 0), (left, size - new_w - left))
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.BICUBIC), dtype=np.uint8)
    return Image.fromarray(np.pad(resized, (*pad, (0, 0)), mode="edge"))


def prepare_image(processor, image, rule: dict):
    """Pixel tensor [3, S, S] of ``image`` (RGB PIL) under the task's image rule."""
    import numpy as np
    import torch

    processing = processor.image_processor
    size = processing.size["height"]
    if rule.get("resize", "square") == "square":
        return processing(image, return_tensors="pt")["patch_images"][0]
    if rule["resize"] != "ocr_pad":
        raise OfaconvError(f"unknown image rule {rule['resize']!r}", path=TASKS_FILE)
    padded = _ocr_pad(image, size, int(rule.get("min_side", 64)))
    mean = np.asarray(processing.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processing.image_std, dtype=np.float32)[:, None, None]
    array = np.asarray(padded, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
    return torch.from_numpy((array - mean) / std)


# ---------------------------------------------------------------------------------------------
# Decoding and post-processing
# ---------------------------------------------------------------------------------------------


def decode_text(tokenizer, ids, family: str) -> str:
    """Generated ids as text, as ModelScope's OFA tokenizers decode them (``skip_special_tokens``):
    special tokens dropped, runs of text tokens joined by the family's rule, image-code and bin
    tokens kept as separate words."""
    from .tokenization import vocab_layout

    layout = vocab_layout(family)
    special = {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
               layout.mask_id}
    segments, run = [], []

    def flush():
        if run:
            tokens = tokenizer.convert_ids_to_tokens(run)
            segments.append(tokenizer.convert_tokens_to_string(tokens) if family == "en"
                            else " ".join(tokens).replace(" ##", "").strip())
            run.clear()

    for token in (int(t) for t in ids):
        if token in special:
            continue
        if token > layout.mask_id:
            flush()
            segments.append(tokenizer.convert_ids_to_tokens(token))
        else:
            run.append(token)
    flush()
    return " ".join(segments).strip()


def post_process(text: str, steps: list) -> str:
    for step in steps or []:
        if step == "strip_punctuation":
            text = text.translate(str.maketrans({key: None for key in string.punctuation})).strip()
        elif isinstance(step, dict) and "join_spaces" in step:
            cls = step["join_spaces"]
            text = re.sub(f"((?<={cls}) +| +(?={cls}))", "", text)
        else:
            raise OfaconvError(f"unknown post-processing step {step!r}", path=TASKS_FILE)
    return text


def bins_to_box(tokens: list[int], *, first_bin: int, num_bins: int, max_image_size: int, image_size: int,
                width: int, height: int) -> list[float]:
    """Four ``<bin_*>`` ids -> [x0, y0, x1, y1] in the image's pixels, as OFA's refcoco task and
    ModelScope compute it (float32: bin / (num_bins - 1) * max_image_size / (S / side)), clipped
    to the image."""
    import torch

    region = torch.tensor(tokens[:4]) - first_bin
    region = region / (num_bins - 1) * max_image_size
    region[::2] /= torch.tensor(image_size / width)
    region[1::2] /= torch.tensor(image_size / height)
    limits = [width, height, width, height]
    return [min(max(float(v), 0.0), float(limit)) for v, limit in zip(region.tolist(), limits)]


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One (image, text) pair ready for the model."""

    input_ids: list[int]
    pixels: object  # torch.Tensor [3, S, S]
    width: int
    height: int
    query: Optional[str]


class TaskInputs:
    """(image, text) -> :class:`Prepared`: the task's prompt (template, text cleaning, the folder's
    ``max_src_length`` truncation) and image rule. Holds the processor, never the model."""

    def __init__(self, processor, spec: dict, template: str, max_src_length=None):
        self.processor, self.spec, self.template = processor, spec, template
        self.tokenizer = processor.tokenizer
        self.max_src_length = max_src_length

    @property
    def needs_text(self) -> bool:
        return self.spec.get("text") == "required"

    def prompt(self, text: Optional[str]) -> str:
        if not self.needs_text:
            return self.template
        return self.template.format(clean_text(text, self.spec.get("text_rule")))

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(self.max_src_length, int) and self.max_src_length > 0:
            ids = ids[: self.max_src_length]  # ModelScope's tokenize_text truncation
        t = self.tokenizer
        return [t.bos_token_id, *ids, t.eos_token_id] if special else list(ids)

    def __call__(self, image, text: Optional[str]) -> Prepared:
        image = image.convert("RGB")
        return Prepared(self.encode(self.prompt(text)), prepare_image(self.processor, image, self.spec.get("image", {})),
                        image.width, image.height, text)


class TaskRunner:
    """Runs ``task`` with a loaded model and processor. ``config`` is the folder's config.json (its
    ``task_prompt`` is used when the folder was finetuned for this task); ``answers`` overrides the
    task's answer list (VQA: constrain generation to it; matching: the labels scored)."""

    def __init__(self, model, processor, task: str, config: Optional[dict] = None, *, answers=None,
                 generate_kwargs: Optional[dict] = None):
        from .tokenization import vocab_layout

        self.model, self.processor, self.task = model, processor, task
        self.spec = task_spec(task)
        self.family = processor.family
        self.tokenizer = processor.tokenizer
        self.layout = vocab_layout(self.family)
        config = config or {}
        # what the folder says about its own task (ofaconv upgrade of a ModelScope folder writes
        # task_prompt and task_settings); another task runs on the task's defaults
        own_task = (config.get("task") or "caption") == task
        settings = config.get("task_settings") if own_task and isinstance(config.get("task_settings"), dict) else {}
        own_prompt = config.get("task_prompt") if own_task else None
        template = own_prompt if isinstance(own_prompt, str) and own_prompt else self.spec["prompt"][self.family]
        self.inputs = TaskInputs(processor, self.spec, template, settings.get("max_src_length"))
        self.decode_spec = dict(self.spec.get("decode", {}))
        if settings.get("gen_type") == "traverse" and self.decode_spec.get("answers") == "trie":
            self.decode_spec["kind"] = "score"  # ModelScope's classification mode: every answer scored
        if settings.get("prompt_type") in ("none", "src", "prev_output") and "decoder_prompt" in self.decode_spec:
            self.decode_spec["decoder_prompt"] = "bos" if settings["prompt_type"] == "none" else "source"
        if settings.get("is_document"):
            raise OfaconvError("document OCR (ModelScope is_document) is not supported; use a scene-text OCR folder",
                               path="config.json", key="task_settings.is_document")
        listed = self.decode_spec.get("answers")
        if answers is None:
            answers = settings.get("answers") or (listed if isinstance(listed, list) else None)
        self.answers = list(answers) if answers else None
        self.trie = self._trie(self.answers) if self.answers else None
        if self.decode_spec.get("kind") == "score" and self.trie is None:
            raise OfaconvError(f"the {task} task scores an answer list and none was given; pass --answers FILE")
        self.generate_kwargs = dict(generate_kwargs or {})
        data = _load()
        self.num_bins = int(settings.get("num_bins") or data["num_bins"])
        self.max_image_size = int(settings.get("max_image_size") or data["max_image_size"])

    # -- inputs

    @property
    def needs_text(self) -> bool:
        return self.inputs.needs_text

    def prompt(self, text: Optional[str]) -> str:
        return self.inputs.prompt(text)

    def prepare(self, image, text: Optional[str]) -> Prepared:
        return self.inputs(image, text)

    def _trie(self, answers: list[str]) -> AnswerTrie:
        trie = AnswerTrie()
        self.answer_ids = []
        for answer in answers:
            ids = self.inputs.encode(" " + answer, special=False)
            self.answer_ids.append(ids)
            trie.insert([self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id])
        return trie

    # -- running

    def run(self, item: Prepared) -> dict:
        """The task's output fields for one prepared pair (plus ``score`` where there is one)."""
        return self.run_batch([item])[0]

    def run_batch(self, items: list) -> list[dict]:
        """:meth:`run` for each item, in order. Items whose prompts have the same length (every
        item of a task without text, or with one ``--text``) share one encoder pass and one beam
        search; prompts of other lengths run in their own group, never padded, so a batch computes
        what one item at a time computes (up to float rounding of the wider matrices)."""
        import torch

        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(len(item.input_ids), []).append(i)
        results: list = [None] * len(items)
        score = self.decode_spec.get("kind", "generate") == "score"
        with torch.inference_mode():
            for indices in groups.values():
                group = [items[i] for i in indices]
                encoder_outputs = self._encode(group)
                outs = self._score(group, encoder_outputs) if score else self._generate(group, encoder_outputs)
                for i, out in zip(indices, outs):
                    results[i] = out
        return results

    def _encode(self, items: list):
        import torch

        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        ids = torch.tensor([item.input_ids for item in items], device=device)
        return self.model.get_encoder()(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            patch_images=torch.stack([item.pixels for item in items]).to(device=device, dtype=dtype),
            patch_masks=torch.ones(len(items), dtype=torch.bool, device=device),
        )

    def _generate(self, items: list, encoder_outputs) -> list[dict]:
        from transformers import LogitsProcessorList

        from .modeling.generation_ofa import SearchHooks, fairseq_search, resolve_settings

        spec = self.decode_spec
        kwargs = dict(self.generate_kwargs)
        if "length" in spec:
            kwargs.update(min_len=int(spec["length"]), max_len_a=0, max_len_b=int(spec["length"]))
        settings, _, _, _ = resolve_settings(self.model, None, kwargs)
        bins = (self.layout.bin_ids.start, self.layout.bin_ids.stop)
        if spec.get("constraint_range") == "bins" and settings.constraint_range is None:
            settings.constraint_range = bins
        hooks = SearchHooks()
        if spec.get("only") == "bins":
            hooks.logits_processor = LogitsProcessorList([_OnlyIds(range(*bins), keep=settings.eos)])
        if spec.get("answers") == "trie" and self.trie is not None:
            settings.logits_mask = _TrieMask(self.trie, self.model.config.vocab_size)
        found = fairseq_search(self.model, encoder_outputs, settings, src_len=len(items[0].input_ids), hooks=hooks)
        outs = []
        output = self.spec["output"]
        for item, hypotheses in zip(items, found):
            tokens = hypotheses[0]["tokens"].tolist()
            out = {"tokens": tokens, "score": float(hypotheses[0]["score"])}
            if output.get("box"):
                out[output["field"]] = bins_to_box(
                    tokens, first_bin=bins[0], num_bins=self.num_bins, max_image_size=self.max_image_size,
                    image_size=int(item.pixels.shape[-1]), width=item.width, height=item.height)
            else:
                text = decode_text(self.tokenizer, tokens, self.family)
                out[output["field"]] = post_process(text, (output.get("post") or {}).get(self.family, []))
            outs.append(out)
        return outs

    def _score(self, items: list, encoder_outputs) -> list[dict]:
        """ModelScope's traverse inference, item by item on the shared encoder pass."""
        import torch

        from .modeling.generation_ofa import _select_encoder_rows

        device = encoder_outputs.last_hidden_state.device
        return [self._score_one(item, _select_encoder_rows(encoder_outputs, torch.tensor([row], device=device)))
                for row, item in enumerate(items)]

    def _score_one(self, item: Prepared, encoder_outputs) -> dict:
        """Every answer scored teacher-forced after the decoder prompt."""
        import torch
        import torch.nn.functional as F

        device = encoder_outputs.last_hidden_state.device
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        prompt = item.input_ids[:-1] if self.decode_spec.get("decoder_prompt") == "source" else [bos]
        totals = []
        for answer in self.answer_ids:
            previous = torch.tensor([prompt + answer], device=device)
            target = prompt[1:] + answer + [eos]
            logits = self.model(decoder_input_ids=previous, encoder_outputs=encoder_outputs, use_cache=False).logits[0]
            total = 0.0
            for position in range(len(prompt) - 1, len(target)):
                allowed = self.trie.next([bos, *answer[: position - len(prompt) + 1]])
                row = torch.full_like(logits[position], -math.inf)
                row[allowed] = logits[position, allowed]
                total += float(F.log_softmax(row.float(), dim=-1)[target[position]])
            totals.append(total)
        probs = torch.softmax(torch.tensor(totals, dtype=torch.float32), dim=-1).tolist()
        best = max(range(len(totals)), key=lambda i: (totals[i], -i))
        field = self.spec["output"]["field"]
        if field == "scores":
            return {"scores": dict(zip(self.answers, probs)), "label": self.answers[best], "logprobs": totals}
        return {field: self.answers[best], "score": probs[best], "logprobs": totals}


class _OnlyIds:
    """A logits processor leaving only ``ids`` (and ``keep``, the EOS fairseq forces at the end)."""

    def __init__(self, ids: range, keep: int):
        self.start, self.stop, self.keep = ids.start, ids.stop, keep

    def __call__(self, input_ids, scores):
        kept = scores[:, self.keep].clone()
        scores[:, : self.start] = -math.inf
        scores[:, self.stop :] = -math.inf
        scores[:, self.keep] = kept
        return scores


class _TrieMask:
    """``SearchSettings.logits_mask`` for an answer trie (each row's generated prefix, from ``<s>``)."""

    def __init__(self, trie: AnswerTrie, vocab_size: int):
        self.trie, self.vocab_size = trie, vocab_size

    def __call__(self, tokens):
        import torch

        mask = torch.zeros(tokens.shape[0], self.vocab_size, dtype=torch.bool)
        for row, prefix in enumerate(tokens.tolist()):
            mask[row, self.trie.next(prefix)] = True
        return mask
