"""Cross-version check of ofaconv's CLIP folders: written with transformers 5, loaded with the stock
classes of an older transformers (no ofaconv import on the load side), outputs compared.

Not collected by pytest (it needs a second transformers install). By hand, from the repo root:

  python tests/crossversion/clip_folders.py make /tmp/xver          # ofaconv's env (transformers 5)
  pip install --no-deps --target /tmp/tf457 transformers==4.57.6 huggingface_hub==0.36.0 \
      tokenizers==0.22.1 requests urllib3 idna certifi charset-normalizer
  PYTHONPATH=/tmp/tf457 python tests/crossversion/clip_folders.py load /tmp/xver
  (4.40: transformers==4.40.2 huggingface_hub==0.23.5 tokenizers==0.19.1)

``load`` prints the max abs difference of every output against the transformers-5 reference; any
missing/unexpected-key warning of the old version shows in its log.
"""
import json
import sys
from pathlib import Path
import torch

mode, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
pixels = torch.rand(2, 3, 224, 224) * 2 - 1


def outputs(root):
    import transformers
    from transformers import (AutoProcessor, BertModel, CLIPVisionModelWithProjection, ChineseCLIPModel,
                              VisionTextDualEncoderModel)
    res = {"transformers": transformers.__version__}
    texts = ["一辆公交车", "红色的花"]
    # canonical BertCLIP folder
    model = VisionTextDualEncoderModel.from_pretrained(root / "bertclip", output_loading_info=False).eval()
    proc = AutoProcessor.from_pretrained(root / "bertclip")
    size = model.config.vision_config.image_size
    px = torch.nn.functional.interpolate(pixels, size=(size, size))
    enc = proc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        o = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
        res["bertclip_logits"] = o.logits_per_image.tolist()
        vt = CLIPVisionModelWithProjection.from_pretrained(root / "bertclip" / "vision_tower").eval()
        res["vision_tower"] = vt(pixel_values=px).image_embeds.tolist()
        bert = BertModel.from_pretrained(root / "bertclip" / "text_tower").eval()
        res["text_tower_pooled"] = bert(**{k: enc[k] for k in ("input_ids", "attention_mask")}).pooler_output.tolist()
        res["processor_ids"] = enc["input_ids"].tolist()
        res["processor_pixels_sum"] = float(proc.image_processor(images=[torch.zeros(3, 40, 30).numpy().transpose(1, 2, 0).astype("uint8")], return_tensors="pt")["pixel_values"].sum())
        cn = ChineseCLIPModel.from_pretrained(root / "cnclip").eval()
        csize = cn.config.vision_config.image_size
        cpx = torch.nn.functional.interpolate(pixels, size=(csize, csize))
        ids = torch.tensor([[101, 5, 6, 7, 102]])
        res["cnclip_logits"] = cn(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=cpx).logits_per_image.tolist()
    return res


if mode == "make":
    from ofaconv.clip import synth
    from ofaconv.clip.convert import convert
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "bertclip").exists():
        convert(synth.write_legacy_bertclip(out / "legacy"), out / "bertclip", verify=True)
    convert(synth.write_cnclip_pt(out / "cn.pt", "ViT-B-16"), out / "cnclip", verify=True, vocab=str(synth.write_vocab(out / "vocab.txt")))
    (out / "reference.json").write_text(json.dumps(outputs(out)))
else:
    ref = json.loads((out / "reference.json").read_text())
    got = outputs(out)
    import numpy as np
    worst = 0.0
    for k, v in ref.items():
        if k == "transformers":
            continue
        d = float(np.max(np.abs(np.array(v, dtype=float) - np.array(got[k], dtype=float))))
        worst = max(worst, d)
        print(f"{k}: max abs diff {d:.3g}")
    print(f"reference transformers {ref['transformers']} vs {got['transformers']}: worst {worst:.3g}")
