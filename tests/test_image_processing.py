"""OFA image processor (fairseq preprocessing, bit for bit) and processor (save_processing, Auto*
loading with and without ofaconv installed)."""

import io
import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.modeling.image_processing_ofa import OFAImageProcessor
from ofaconv.ofa.modeling.processing_ofa import OFAProcessor
from ofaconv.ofa.tokenization import save_processing

EN_PROMPT_IDS = [0, 99, 473, 5, 2274, 6190, 116, 2]
CN_PROMPT_IDS = [0, 1749, 4279, 2993, 6839, 753, 788, 724, 1083, 2163, 140, 2]


def _photo(width, height, seed=0) -> np.ndarray:
    """A smooth scene plus sensor noise: gradients, an edge and texture, like a real photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * (0.5 + 0.5 * np.sin(y / 7.0 + x / 11.0))
    b = np.where((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2, 220.0, 30.0)
    image = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _png_roundtrip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return Image.open(buffer)


def _images() -> dict:
    rng = np.random.default_rng(1)
    photo = Image.fromarray(_photo(211, 157))
    rgba = np.dstack([_photo(120, 90, 2), rng.integers(0, 256, (90, 120), dtype=np.uint8)])
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.float32)[None, :, None], (40, 1, 3)).astype(np.uint8)
    return {
        "photo_non_square": photo,
        "gradient_wide": Image.fromarray(gradient),
        "noise_square": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "tall_small": Image.fromarray(_photo(13, 77, 3)),
        "rgba": Image.fromarray(rgba, mode="RGBA"),
        "grayscale": photo.convert("L"),
        "cmyk": photo.convert("CMYK"),
        "palette_png": _png_roundtrip(photo.convert("P", palette=Image.ADAPTIVE, colors=64)),
        "bilevel": photo.convert("1"),
        "jpeg": Image.open(io.BytesIO(_encode(photo, "JPEG"))),
    }


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = _images()


def reference_pil_numpy(image: Image.Image, size: int) -> np.ndarray:
    """fairseq's transform written with PIL + numpy: convert RGB, PIL bicubic to (S, S), /255, (x-0.5)/0.5."""
    rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = np.array(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return ((pixels - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)


def reference_torchvision(image: Image.Image, size: int) -> torch.Tensor:
    """fairseq OFA's own Compose (data/mm_data/caption_dataset.py)."""
    transforms = pytest.importorskip("torchvision.transforms")
    compose = transforms.Compose(
        [
            lambda im: im.convert("RGB"),
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
    return compose(image)


# ---------------------------------------------------------------------------------------------
# Image processor


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("size", [64, 480])
def test_matches_fairseq_preprocessing(name, size):
    image = IMAGES[name]
    out = OFAImageProcessor(size=size)(image)
    patch = out["patch_images"]
    assert patch.shape == (1, 3, size, size) and patch.dtype == torch.float32
    assert out["patch_masks"].dtype == torch.bool and out["patch_masks"].tolist() == [True]

    expected = reference_pil_numpy(image, size)
    assert np.abs(patch[0].numpy() - expected).max() <= 1e-6
    fairseq = reference_torchvision(image, size)
    assert (patch[0] - fairseq).abs().max().item() <= 1e-6
    assert torch.equal(patch[0], fairseq)  # bit for bit, in fact


def test_mutations_are_caught():
    """Each plausible mistake moves pixels beyond the 1e-6 tolerance (or off bit-exactness)."""
    image = IMAGES["photo_non_square"]
    fairseq = torch.from_numpy(reference_pil_numpy(image, 64))
    bilinear = OFAImageProcessor(size=64, resample=Image.BILINEAR)(image)["patch_images"][0]
    imagenet = OFAImageProcessor(size=64, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])(image)
    assert (bilinear - fairseq).abs().max() > 1e-3
    assert (imagenet["patch_images"][0] - fairseq).abs().max() > 1e-3
    # HF's usual `rescale_factor = 1/255` multiplies; ToTensor divides. Not the same floats.
    pixels = np.array(image.convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.uint8).astype(np.float32)
    multiplied = (pixels * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)
    assert not np.array_equal(multiplied.transpose(2, 0, 1), fairseq.numpy())
    # Aspect-preserving resize + crop (what most HF processors do) is a different image.
    shorter = image.convert("RGB").resize((86, 64), Image.BICUBIC).crop((11, 0, 75, 64))
    cropped = (np.asarray(shorter, dtype=np.float32) / 255 - 0.5) / 0.5
    assert np.abs(cropped.transpose(2, 0, 1) - fairseq.numpy()).max() > 1e-2


def test_input_kinds_agree(tmp_path):
    photo = IMAGES["photo_non_square"]
    path = tmp_path / "photo.png"
    photo.save(path)
    array = np.array(photo)
    processor = OFAImageProcessor(size=48)
    expected = processor(photo)["patch_images"]
    for image in (str(path), path, path.read_bytes(), array, torch.from_numpy(array).permute(2, 0, 1), Image.open(path)):
        assert torch.equal(processor(image)["patch_images"], expected)
    batch = processor([photo, str(path), array])
    assert batch["patch_images"].shape == (3, 3, 48, 48) and batch["patch_masks"].tolist() == [True] * 3
    assert torch.equal(batch["patch_images"][1], expected[0])
    as_numpy = processor(photo, return_tensors="np")
    assert isinstance(as_numpy["patch_images"], np.ndarray) and as_numpy["patch_images"].dtype == np.float32
    assert np.array_equal(as_numpy["patch_images"], expected.numpy())
    assert processor(photo, size=32)["patch_images"].shape == (1, 3, 32, 32)


def test_bad_images_name_the_file(tmp_path):
    processor = OFAImageProcessor(size=32)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 definitely not a jpeg " * 10)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_encode(IMAGES["photo_non_square"], "PNG")[:400])
    for bad in (garbage, truncated):
        with pytest.raises(OfaconvError, match=rf"^{bad}: cannot read image") as info:
            processor(str(bad))
        assert "\n" not in str(info.value)
    with pytest.raises(OfaconvError, match="no such image file"):
        processor(tmp_path / "missing.png")
    with pytest.raises(OfaconvError, match=r"<image bytes #1>: cannot read image"):
        processor([IMAGES["noise_square"], b"not an image"])
    with pytest.raises(OfaconvError, match="must be uint8"):
        processor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(OfaconvError, match="shape"):
        processor(np.zeros((8, 8, 7), dtype=np.uint8))


def test_save_and_load_round_trip(tmp_path):
    processor = OFAImageProcessor(size=384)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "OFAImageProcessor"
    assert config["size"] == {"height": 384, "width": 384} and config["resample"] == Image.BICUBIC
    assert config["image_mean"] == config["image_std"] == [0.5, 0.5, 0.5]
    loaded = OFAImageProcessor.from_pretrained(tmp_path)
    image = IMAGES["cmyk"]
    assert torch.equal(loaded(image)["patch_images"], processor(image)["patch_images"])


# ---------------------------------------------------------------------------------------------
# Processor


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("processing")
    result = {}
    for family, size in (("en", 64), ("cn", 48)):
        folder = root / family
        save_processing(folder, family, size)
        # A converted folder also holds the model's config.json; AutoTokenizer reads model_type.
        (folder / "config.json").write_text('{"model_type": "ofa"}', encoding="utf-8")
        result[family] = folder
    return result


@pytest.mark.parametrize("family", ["en", "cn"])
def test_save_processing_files(folders, family):
    folder = folders[family]
    names = set(os.listdir(folder))
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
            "image_processing_ofa.py", "processing_ofa.py", "tokenization_ofa.py"} <= names
    assert not [n for n in os.listdir(folder.parent) if n.startswith(".")]  # staging folder removed
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "OFAImageProcessor"
    assert pre["auto_map"]["AutoImageProcessor"] == "image_processing_ofa.OFAImageProcessor"
    size = {"en": 64, "cn": 48}[family]
    assert pre["size"] == {"height": size, "width": size}
    proc = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
    assert proc["processor_class"] == "OFAProcessor" and proc["auto_map"] == {"AutoProcessor": "processing_ofa.OFAProcessor"}
    assert proc["family"] == family
    assert proc["prompt"] == {"en": " what does the image describe?", "cn": "图片描述了什么内容?"}[family]


@pytest.mark.parametrize("family", ["en", "cn"])
def test_saved_processing_files_are_what_the_classes_write(folders, family, tmp_path):
    """save_processing writes the JSON without building the classes (a converter start-up cost):
    the files must be byte-identical to the classes' own save_pretrained output."""
    folder = folders[family]
    processor = OFAProcessor.from_pretrained(folder)
    processor.auto_map = {"AutoProcessor": "processing_ofa.OFAProcessor"}
    processor.image_processor.auto_map = {"AutoImageProcessor": "image_processing_ofa.OFAImageProcessor",
                                          "AutoProcessor": "processing_ofa.OFAProcessor"}
    processor.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (folder / name).read_text(encoding="utf-8"), name
    fresh = OFAImageProcessor(size={"en": 64, "cn": 48}[family]).to_dict()
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "auto_map"} == fresh  # the class defaults, nothing else
    ours = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    theirs = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert ours["processor_class"] == theirs["processor_class"] == "OFAProcessor"


@pytest.mark.parametrize("family", ["en", "cn"])
def test_processor_call(folders, family):
    processor = OFAProcessor.from_pretrained(folders[family])
    size = {"en": 64, "cn": 48}[family]
    prompt_ids = {"en": EN_PROMPT_IDS, "cn": CN_PROMPT_IDS}[family]
    images = [IMAGES["photo_non_square"], IMAGES["rgba"]]
    out = processor(images=images)
    assert set(out) == {"input_ids", "attention_mask", "patch_images", "patch_masks"}
    assert out["input_ids"].tolist() == [prompt_ids, prompt_ids]
    assert out["attention_mask"].tolist() == [[1] * len(prompt_ids)] * 2
    assert out["patch_images"].shape == (2, 3, size, size) and out["patch_masks"].tolist() == [True, True]
    assert torch.equal(out["patch_images"][1], torch.from_numpy(reference_pil_numpy(IMAGES["rgba"], size)))

    mixed = processor(images=images, text=["a", "a much longer question about the picture?"])
    assert mixed["input_ids"].shape[0] == 2 and mixed["attention_mask"][0, -1].item() == 0
    assert mixed["input_ids"][0, mixed["attention_mask"][0].sum() :].eq(processor.tokenizer.pad_token_id).all()
    text_only = processor(text="hello")
    assert set(text_only) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="2 texts for 1 images"):
        processor(images=images[0], text=["a", "b"])
    with pytest.raises(ValueError, match="needs images, text, or both"):
        processor()


def test_processor_batch_decode(folders):
    cn = OFAProcessor.from_pretrained(folders["cn"])
    ids = cn.tokenizer(["红色的iPhone 13手机", "一只猫,很可爱。"], padding=True, return_tensors="pt")["input_ids"]
    assert cn.batch_decode(ids) == ["红色的iphone 13手机", "一只猫,很可爱。"]
    assert cn.decode(ids[0]) == "红色的iphone 13手机"
    en = OFAProcessor.from_pretrained(folders["en"])
    ids = en.tokenizer([" a dog on a couch", " two cats"], padding=True, return_tensors="pt")["input_ids"]
    assert en.batch_decode(ids) == ["a dog on a couch", "two cats"]


_CLEAN_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.extend(sys.argv[1].split("|"))
    try:
        import ofaconv
    except ImportError:
        pass
    else:
        raise SystemExit("ofaconv is importable in the clean interpreter")
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    image = Image.open(sys.argv[2])
    results = {}
    for family, folder in zip(("en", "cn"), sys.argv[3:5]):
        tokenizer = AutoTokenizer.from_pretrained(folder)  # stock class, no remote code
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__name__ == "OFAProcessor", type(processor)
        assert type(image_processor).__name__ == "OFAImageProcessor", type(image_processor)
        out = processor(images=[image, image])
        results[family + "_input_ids"] = out["input_ids"].numpy()
        results[family + "_attention_mask"] = out["attention_mask"].numpy()
        results[family + "_patch_images"] = out["patch_images"].numpy()
        results[family + "_patch_masks"] = out["patch_masks"].numpy()
        results[family + "_image_processor"] = image_processor(image)["patch_images"].numpy()
        results[family + "_tokenizer"] = np.array(tokenizer(processor.prompt)["input_ids"])
        caption = "红色的iPhone 13手机" if family == "cn" else " a red phone"
        ids = tokenizer(caption)["input_ids"]
        results[family + "_decode"] = np.array([tokenizer.decode(ids, skip_special_tokens=True), processor.batch_decode([ids])[0]])
    np.savez(sys.argv[5], **results)
    """
)


@pytest.mark.slow
def test_loads_without_ofaconv(tmp_path, folders):
    """A clean interpreter (no site hooks, so no editable ofaconv) loads the folder with Auto*."""
    image_path = tmp_path / "photo.png"
    IMAGES["photo_non_square"].save(image_path)
    paths = sysconfig.get_paths()
    site = "|".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    result_path = tmp_path / "result.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run(
        [sys.executable, "-S", "-c", _CLEAN_SCRIPT, site, str(image_path), str(folders["en"]), str(folders["cn"]), str(result_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(result_path)
    for family in ("en", "cn"):
        processor = OFAProcessor.from_pretrained(folders[family])
        expected = processor(images=[IMAGES["photo_non_square"]] * 2)
        for key in ("input_ids", "attention_mask", "patch_images", "patch_masks"):
            assert np.array_equal(got[f"{family}_{key}"], expected[key].numpy()), key
        assert np.array_equal(got[f"{family}_image_processor"], expected["patch_images"][:1].numpy())
        prompt_ids = {"en": EN_PROMPT_IDS, "cn": CN_PROMPT_IDS}[family]
        assert got[f"{family}_tokenizer"].tolist() == prompt_ids
    assert got["cn_decode"].tolist() == ["红色的iphone 13手机", "红色的iphone 13手机"]
    assert got["en_decode"].tolist() == [" a red phone", "a red phone"]


def test_register_processing(folders):
    """With ofaconv installed, Auto* resolve to ofaconv's classes without trust_remote_code."""
    from transformers import AutoImageProcessor, AutoProcessor

    from ofaconv.ofa.modeling.image_processing_ofa import OFAImageProcessor as LocalImageProcessor
    from ofaconv.ofa.modeling.register import register

    register()
    register()  # idempotent
    processor = AutoProcessor.from_pretrained(folders["cn"])
    image_processor = AutoImageProcessor.from_pretrained(folders["cn"])
    assert type(processor) is OFAProcessor
    assert type(image_processor) is LocalImageProcessor
    assert processor(images=Image.new("RGB", (9, 5)))["patch_images"].shape == (1, 3, 48, 48)
