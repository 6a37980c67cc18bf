"""A converted folder works where ofaconv is not installed (trust_remote_code), and its keys are
those of the existing OFA ports."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ofaconv.ofa.convert import convert_checkpoint
from ofaconv.ofa.synth import write_synthetic_checkpoint

ROOT = Path(__file__).resolve().parents[1]

_CLEAN = textwrap.dedent(
    """
    import sys
    sys.path.extend(sys.argv[1].split("|"))
    try:
        import ofaconv
    except ImportError:
        pass
    else:
        raise SystemExit("ofaconv is importable in the clean interpreter")
    import torch
    from PIL import Image
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    folder, inputs_path, out_path, image_path = sys.argv[2:6]
    # eager, as ofaconv's verify path loads it: bit-exact with the in-process model
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(inputs["input_ids"], inputs["patch_images"], inputs["patch_masks"],
                       inputs["decoder_input_ids"]).logits
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        batch = processor(images=[Image.open(image_path)], return_tensors="pt")
        generated = model.generate(**batch, num_beams=2, max_len_b=5)
    torch.save({"logits": logits, "generated": generated, "class": type(model).__name__,
                "caption": processor.batch_decode(generated, skip_special_tokens=True)}, out_path)
    loaded = sorted(m for m in sys.modules if m == "ofaconv" or m.startswith("ofaconv."))
    if loaded:
        raise SystemExit(f"ofaconv was imported in the model process: {loaded}")
    """
)


@pytest.mark.slow
def test_folder_works_without_ofaconv(tmp_path):
    from PIL import Image

    from ofaconv.ofa.verify import load_converted, probe_inputs

    src = tmp_path / "src.pt"
    write_synthetic_checkpoint(src, "ofa-cn-base", size="micro", seed=3)
    out = tmp_path / "out"
    convert_checkpoint(src, out)
    model, _ = load_converted(out)
    inputs = probe_inputs(model.config, out)
    torch.save(inputs, tmp_path / "inputs.pt")
    image = tmp_path / "photo.png"
    Image.new("RGB", (97, 61), (200, 30, 40)).save(image)
    with torch.no_grad():
        expected = model(**inputs).logits

    paths = sysconfig.get_paths()
    site = "|".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run(
        [sys.executable, "-S", "-c", _CLEAN, site, str(out), str(tmp_path / "inputs.pt"),
         str(tmp_path / "result.pt"), str(image)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["class"] == "OFAForConditionalGeneration"
    assert torch.equal(result["logits"], expected)
    assert result["generated"].shape[0] == 1 and result["generated"][0, 0].item() == 0
    assert isinstance(result["caption"][0], str)


def _key_list(name: str) -> set[str]:
    return {line.split("\t")[0] for line in (ROOT / "fixtures" / "keys" / name).read_text().splitlines() if line}


def test_our_keys_are_the_ports_keys(official_micro_converted):
    """Stored keys + tied aliases + derived buffers == the key set of the existing ports."""
    with safe_open(str(official_micro_converted / "model.safetensors"), "pt") as f:
        ours = set(f.keys())
    port = _key_list("hf_port_ofa_micro.txt")
    tied = {"decoder.embed_tokens.weight", "decoder.output_projection.weight"}
    derived = {"encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
               "decoder.image_rp_bucket", "decoder.image_position_idx"}
    assert ours | tied | derived == port
    assert not ours & (tied | derived)
