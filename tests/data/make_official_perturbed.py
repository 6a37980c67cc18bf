"""Regenerate ``reference_official_perturbed.pt``: the OFFICIAL fairseq OFA code run on the
micro checkpoint with every weight perturbed (tests/test_reference.py::perturb_state_dict).

Not part of the test suite and not importable without the official code. How it was run:

- OFA-Sys/OFA at commit a36b91c (``fairseq/``, ``models/``, ``data/``, ``utils/``, ``tasks/``,
  ``criterions/`` extracted to $OFA_SRC), on Python 3.11 with torch 2.14.1 CPU;
- ``pip install --target $DEPS "hydra-core>=1.0.7,<1.1" "omegaconf<2.1" bitarray regex
  sacrebleu`` (numpy removed from $DEPS so the venv's numpy is used);
- Python 3.11 compatibility shims applied before ``import fairseq``: ``np.float``/``np.int``/...
  aliases restored, and dataclass fields whose default is a dataclass instance turned into
  ``default_factory`` fields (fairseq's configs and hydra 1.0's ``conf`` rely on the old
  behaviour); fairseq's ``dataclass/initialize.py`` reads ``default_factory()`` when a field
  has no plain default. None of these touch the model or generator code paths.

    PYTHONPATH=$OFA_SRC/fairseq:$OFA_SRC:$DEPS python tests/data/make_official_perturbed.py

The script writes the inputs it used, the official teacher-forced logits for each case, and the
official SequenceGenerator results (incremental decoding, as fairseq runs it) for several
settings.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import shim  # noqa: E402,F401  (the Python 3.11 shims described above, kept outside the repo)
from fairseq.data import Dictionary  # noqa: E402
from models.ofa import OFAModel  # noqa: E402
from models.sequence_generator import SequenceGenerator  # noqa: E402

from conftest import gunzip_official_checkpoint, official_file  # noqa: E402
from test_reference import boost_special_tokens, load_official_checkpoint, perturb_state_dict  # noqa: E402

torch.set_flush_denormal(True)
torch.manual_seed(0)


class _Task:
    def __init__(self, dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def build_official(args: argparse.Namespace, state_dict: dict):
    dictionary = Dictionary()
    for i in range(len(dictionary), state_dict["encoder.embed_tokens.weight"].shape[0]):
        dictionary.add_symbol(f"<sym_{i}>")
    model = OFAModel.build_model(copy.deepcopy(args), _Task(dictionary))
    model.load_state_dict(copy.deepcopy(state_dict), strict=True, model_cfg=args)
    return model.eval(), dictionary


def official_logits(model, inputs):
    src = inputs["input_ids"]
    with torch.no_grad():
        logits, _ = model(src, src.ne(1).sum(1), inputs["decoder_input_ids"],
                          patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"])
    return logits


def official_generate(model, dictionary, inputs, settings):
    generator = SequenceGenerator([model], dictionary, **settings)
    src = inputs["input_ids"]
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(1).sum(1),
                            "patch_images": inputs["patch_images"],
                            "patch_masks": inputs["patch_masks"]}}
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    return [[{"tokens": h["tokens"].clone(), "score": float(h["score"]),
              "positional_scores": h["positional_scores"].clone()} for h in sent]
            for sent in hypos]


def main(tmp_dir: str, out_path: str):
    ckpt = load_official_checkpoint(gunzip_official_checkpoint(Path(tmp_dir) / "checkpoint.pt"))
    io = torch.load(official_file("reference_io.pt"), weights_only=True)
    base_inputs = io["inputs"]
    args = ckpt["cfg"]["model"]
    state = perturb_state_dict(ckpt["model"])

    padded_inputs = {k: v.clone() for k, v in base_inputs.items()}
    padded_inputs["input_ids"][1, 6:] = 1
    padded_inputs["input_ids"][1, 5] = 2
    padded_inputs["patch_masks"] = torch.tensor([True, False])
    padded_inputs["decoder_input_ids"][1, 4:] = 1
    small_inputs = {**base_inputs,
                    "patch_images": torch.nn.functional.avg_pool2d(base_inputs["patch_images"], 2)}
    padded_inputs["patch_images"] = base_inputs["patch_images"]

    cases = {}

    def run_case(name, case_args, case_state, inputs, generations=()):
        model, dictionary = build_official(case_args, case_state)
        # images are not stored: the test rebuilds them from reference_io.pt
        images = "official" if inputs["patch_images"] is base_inputs["patch_images"] else (
            "official_avgpool2")
        stored = {k: v for k, v in inputs.items() if k != "patch_images"}
        entry = {"inputs": stored, "images": images, "model_args": dict(vars(case_args)),
                 "logits": official_logits(model, inputs), "generations": []}
        if name == "perturbed":
            src = inputs["input_ids"]
            with torch.no_grad():
                enc = model.encoder(src, src.ne(1).sum(1), patch_images=inputs["patch_images"],
                                    patch_masks=inputs["patch_masks"])
            entry["encoder_out"] = enc["encoder_out"][0].transpose(0, 1).contiguous()
        for settings in generations:
            entry["generations"].append(
                {"settings": settings,
                 "hypos": official_generate(model, dictionary, inputs, settings)})
        cases[name] = entry
        print(name, "done", flush=True)

    default_gen = dict(beam_size=5, max_len_a=0, max_len_b=16, min_len=1,
                       no_repeat_ngram_size=3)
    run_case("perturbed", args, state, base_inputs, generations=[
        default_gen,
        dict(default_gen, beam_size=1),
        dict(default_gen, beam_size=1, no_repeat_ngram_size=0),
        dict(beam_size=8, max_len_a=0, max_len_b=10, min_len=4, no_repeat_ngram_size=2,
             len_penalty=0.98, temperature=0.98, unk_penalty=0.5, constraint_range="4,500"),
        dict(beam_size=3, max_len_a=0.5, max_len_b=2, min_len=1, no_repeat_ngram_size=3,
             normalize_scores=False),
    ])
    source_token = int(cases["perturbed"]["logits"][0, 0].argmax())
    run_case("special_tokens", args, boost_special_tokens(state, source_token), padded_inputs,
             generations=[
                 default_gen,
                 dict(default_gen, min_len=4, unk_penalty=0.5, len_penalty=1.5),
                 dict(default_gen, beam_size=1),
                 dict(default_gen, beam_size=3, normalize_scores=False, unk_penalty=2.0),
             ])
    cases["special_tokens"]["source_token"] = source_token
    run_case("entangled", argparse.Namespace(**{**vars(args), "disable_entangle": False}),
             state, base_inputs, generations=[default_gen])
    run_case("padded", args, state, padded_inputs, generations=[default_gen])
    run_case("interpolated",
             argparse.Namespace(**{**vars(args), "interpolate_position": True,
                                   "orig_patch_image_size": 64}),
             state, small_inputs, generations=[dict(default_gen, beam_size=2)])
    post_ln_state = {k: v for k, v in state.items()
                     if not k.startswith(("encoder.layer_norm.", "decoder.layer_norm."))}
    run_case("post_ln",
             argparse.Namespace(**{**vars(args), "encoder_normalize_before": False,
                                   "decoder_normalize_before": False}),
             post_ln_state, small_inputs)
    torch.save({"seed": 0, "cases": cases}, out_path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp",
         sys.argv[2] if len(sys.argv) > 2 else str(HERE / "reference_official_perturbed.pt"))
