#!/usr/bin/env python3
"""Reference fixtures for tests/parity.rs, computed with the Python reference (transformers + Pillow).

Writes, under tests/parity/:
    images/    encoded test inputs: photographs from scikit-image's data folder, hard cases derived
               from them (grey, RGBA, palette, CMYK, EXIF-rotated, progressive, extreme aspect
               ratios, tiny) and two procedural shapes scenes; and a decode-only corpus (JPEG
               subsamplings, restart markers, progressive, YCCK, all EXIF orientations, 16-bit PNG).
    models/    small randomly initialised BLIP and CLIP checkpoints, one per loading/config path the
               Rust side must handle (see MODELS_SPEC below).
    fixtures/  manifest.json (ids, texts, parameters, margins) and safetensors files (pixels, embeds,
               logits, processed scores), read by tests/parity.rs.

Every input is loaded as transformers' `load_image` does (EXIF transpose, convert RGB) and
preprocessed by the PIL image processors (`*ImageProcessorPil`), never the torchvision ones.
Everything is seeded and the script is re-runnable: it rewrites all three folders. Run it again
whenever the embedded models in models/ change (see README.md for the command).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image, features
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
)
from transformers.generation import (
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.image_utils import load_image
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "parity"
IMAGES = HERE / "images"
MODELS = HERE / "models"
FIXTURES = HERE / "fixtures"
sys.path.insert(0, str(ROOT / "tools"))
import scenes  # noqa: E402

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = 3
MAX_LENGTH = 20
# A greedy step whose best two logits are closer than this could legitimately flip between two
# correct implementations (the logits tolerance is 1e-4), so random models are re-drawn until
# every recorded greedy step clears it; the embedded models' margins are recorded as found.
MIN_MARGIN = 1e-3
# Whole fixture files stay below this: a model's image embeddings are sliced to the first tokens.
EMBEDS_TOKENS = 16


def check_environment() -> None:
    # With torchvision importable, transformers' Auto* classes switch to the torchvision backend;
    # this script names the PIL classes explicitly, but the pinned environment must not have it.
    assert importlib.util.find_spec("torchvision") is None, "uninstall torchvision"
    # Pillow 13 changed the pass order of some resizes; the Rust port follows Pillow 12.
    assert PIL.__version__.startswith("12."), f"Pillow {PIL.__version__}, need 12.x"
    assert transformers.__version__.startswith("5."), transformers.__version__
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# Input images


def skimage_data() -> Path:
    # Only the data files are used, so the package is located without being imported.
    spec = importlib.util.find_spec("skimage")
    assert spec and spec.submodule_search_locations, "pip install scikit-image (see requirements.txt)"
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# TurboJPEG API constants (turbojpeg.h, stable since libjpeg-turbo 1.3).
TJPF_RGB, TJPF_CMYK = 0, 11
TJSAMP = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2, "4:4:0": 4, "4:1:1": 5}


def turbojpeg_compress(pixels: np.ndarray, pixel_format: int, subsampling: str, quality: int) -> bytes:
    """Baseline JPEG from libjpeg-turbo's TurboJPEG API (system libturbojpeg, loaded with ctypes):
    it writes what Pillow cannot, YCCK (from CMYK input) and 4:4:0 / 4:1:1 chroma subsampling."""
    path = ctypes.util.find_library("turbojpeg")
    if path is None:
        raise SystemExit("libturbojpeg not found: the YCCK, 4:4:0 and 4:1:1 JPEG inputs are written with "
                         "libjpeg-turbo's TurboJPEG API (Debian/Ubuntu: apt-get install libturbojpeg0)")
    tj = ctypes.CDLL(path)
    tj.tjInitCompress.restype = ctypes.c_void_p
    tj.tjCompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)),
                               ctypes.POINTER(ctypes.c_ulong), ctypes.c_int, ctypes.c_int, ctypes.c_int]
    tj.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
    tj.tjGetErrorStr2.restype = ctypes.c_char_p
    tj.tjFree.argtypes = [ctypes.POINTER(ctypes.c_ubyte)]
    tj.tjDestroy.argtypes = [ctypes.c_void_p]
    # tjCompress2 reads these from the environment; they must not change the output.
    for var in ("TJ_OPTIMIZE", "TJ_ARITHMETIC", "TJ_RESTART", "TJ_PROGRESSIVE"):
        os.environ.pop(var, None)
    h, w, channels = pixels.shape
    src = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    handle = tj.tjInitCompress()
    assert handle, "tjInitCompress failed"
    buf, size = ctypes.POINTER(ctypes.c_ubyte)(), ctypes.c_ulong(0)
    try:
        if tj.tjCompress2(handle, src, w, w * channels, h, pixel_format, ctypes.byref(buf), ctypes.byref(size),
                          TJSAMP[subsampling], quality, 0) != 0:
            raise SystemExit(f"tjCompress2: {tj.tjGetErrorStr2(handle).decode()}")
        return ctypes.string_at(buf, size.value)
    finally:
        if buf:
            tj.tjFree(buf)
        tj.tjDestroy(handle)


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by channel count), written directly: Pillow
    cannot write 16-bit colour. Rows cycle through the five filter types (None, Sub, Up, Average,
    Paeth) so that each is undone on 16-bit samples."""
    grid = samples if samples.ndim == 3 else samples[..., None]
    h, w, channels = grid.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = 2 * channels
    raw = grid.astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(np.int32)
    lines, prior = [], np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):
        cur = raw[y]
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prior
        elif kind == 3:
            pred = (left + prior) // 2
        else:
            p = left + prior - up_left
            pa, pb, pc = abs(p - left), abs(p - prior), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, up_left))
        lines.append(bytes([kind]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes())
        prior = cur

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(lines), 9))
            + chunk(b"IEND", b""))


def jpeg_layout(data: bytes) -> dict:
    """What the decoder is given, read from the markers: frame type, per-component sampling
    factors (h×v), Adobe transform (0 RGB/CMYK, 1 YCbCr, 2 YCCK), restart interval, scan and
    restart marker counts. Recorded in the manifest and used to check each input is what it claims."""
    sof = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
    out = {"frame": None, "sampling": [], "adobe_transform": None, "restart_interval": 0, "scans": 0,
           "restart_markers": 0}
    i = 2
    assert data[:2] == b"\xff\xd8"
    while i < len(data):
        assert data[i] == 0xFF, i
        marker = data[i + 1]
        if marker == 0xD9:
            break
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        seg = data[i + 4 : i + 2 + length]
        if marker in sof:
            out["frame"] = sof[marker]
            out["sampling"] = [f"{seg[7 + 3 * c] >> 4}x{seg[7 + 3 * c] & 15}" for c in range(seg[5])]
        elif marker == 0xDD:
            out["restart_interval"] = struct.unpack(">H", seg[:2])[0]
        elif marker == 0xEE and seg.startswith(b"Adobe"):
            out["adobe_transform"] = seg[11]
        i += 2 + length
        if marker == 0xDA:
            out["scans"] += 1
            while not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):
                if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7:
                    out["restart_markers"] += 1
                    i += 1
                i += 1
    return out


def decode_corpus(data: Path, photo) -> list[tuple]:
    """Inputs that are only decoded (no model, no processor): the JPEG variants libjpeg-turbo
    handles differently (chroma subsampling and its edge upsampling, restart markers, progressive
    and optimised Huffman coding, quality extremes, CMYK and YCCK, RGB without colour transform,
    every EXIF orientation, full-size photographs) and 16-bit PNG. Each is
    (name, format, (Pillow image, save options) or encoded bytes, what it covers, expected markers)."""
    full = lambda name: Image.open(data / name).convert("RGB")  # noqa: E731
    chelsea = photo("chelsea.png", (120, 80))
    coffee = photo("coffee.png", (90, 60))
    astronaut = photo("astronaut.png", (96, 96))
    # 37×29 at full resolution: partial blocks and MCUs in both directions, for every subsampling.
    odd = full("chelsea.png").crop((190, 80, 227, 109))
    camera_odd = Image.open(data / "camera.png").convert("L").resize((61, 47), Image.LANCZOS)
    oriented = full("astronaut.png").crop((0, 0, 512, 384)).resize((40, 30), Image.LANCZOS)

    # CMYK with a real black channel (Pillow's RGB -> CMYK leaves K at 0).
    rgb = np.asarray(coffee, dtype=np.int32)
    k = 255 - rgb.max(axis=2)
    cmy = (255 - k[..., None] - rgb) * 255 // np.maximum(255 - k, 1)[..., None]
    cmyk = np.concatenate([cmy, k[..., None]], axis=2).astype(np.uint8)
    cmyk_img = Image.frombytes("CMYK", coffee.size, cmyk.tobytes())

    rng = np.random.default_rng(20250301)
    # 16-bit grey: bands scaled ×257 (nearly all above 255), ×1 (all at most 255) and ×2 (straddling
    # 255), and a row of edge values; Pillow's convert("RGB") clips each sample to 255.
    cam = np.asarray(Image.open(data / "camera.png").convert("L").resize((64, 47), Image.LANCZOS), dtype=np.uint32)
    scale = np.repeat([257, 1, 2], [16, 16, 15])[:, None]
    edges = np.array([0, 1, 127, 254, 255, 256, 257, 383, 511, 512, 1024, 4095, 32768, 65280, 65534, 65535])
    grey16 = np.concatenate([cam * scale, np.tile(edges, 4)[None]]).astype(np.uint16)
    # 16-bit colour: random low bytes, so keeping the high byte and rounding v / 257 differ often.
    astro16 = np.asarray(photo("astronaut.png", (48, 48)), dtype=np.uint16) << 8
    rgb16 = astro16 | rng.integers(0, 256, astro16.shape, dtype=np.uint16)
    ramp = (np.add.outer(np.arange(48), np.arange(48)) * 65535 // 94).astype(np.uint16)
    ramp[:4, :4] = 0
    rgba16 = np.dstack([astro16 | rng.integers(0, 256, astro16.shape, dtype=np.uint16), ramp])
    cam48 = np.asarray(Image.open(data / "camera.png").convert("L").resize((48, 48), Image.LANCZOS), dtype=np.uint16)
    la16 = np.dstack([(cam48 << 8) | rng.integers(0, 256, cam48.shape, dtype=np.uint16), ramp[::-1]])
    for samples, mode, pillow in ((grey16, "I;16", grey16), (rgb16, "RGB", rgb16 >> 8),
                                  (rgba16, "RGBA", rgba16 >> 8),
                                  (la16, "RGBA", (la16 >> 8)[..., [0, 0, 0, 1]])):
        with Image.open(io.BytesIO(png16(samples))) as im:
            assert im.mode == mode and np.array_equal(np.asarray(im), pillow), f"png16 {mode} does not read back"

    S = lambda sub: {"sampling": {"4:4:4": ["1x1"] * 3, "4:2:2": ["2x1", "1x1", "1x1"],  # noqa: E731
                                  "4:2:0": ["2x2", "1x1", "1x1"], "4:4:0": ["1x2", "1x1", "1x1"],
                                  "4:1:1": ["4x1", "1x1", "1x1"]}[sub]}
    specs = [
        ("chelsea_444_jpg", "jpeg", (chelsea, {"quality": 90, "subsampling": 0}), "baseline 4:4:4", S("4:4:4")),
        ("chelsea_422_jpg", "jpeg", (chelsea, {"quality": 90, "subsampling": 1}), "baseline 4:2:2", S("4:2:2")),
        ("chelsea_odd_444_jpg", "jpeg", (odd, {"quality": 90, "subsampling": 0}), "37×29, 4:4:4", S("4:4:4")),
        ("chelsea_odd_422_jpg", "jpeg", (odd, {"quality": 90, "subsampling": 1}),
         "37×29, 4:2:2: chroma upsampling at a partial right edge", S("4:2:2")),
        ("chelsea_odd_420_jpg", "jpeg", (odd, {"quality": 90, "subsampling": 2}),
         "37×29, 4:2:0: chroma upsampling at partial right and bottom edges", S("4:2:0")),
        ("chelsea_odd_440_jpg", "jpeg", turbojpeg_compress(np.asarray(odd), TJPF_RGB, "4:4:0", 90),
         "37×29, 4:4:0 (chroma halved vertically only)", S("4:4:0")),
        ("chelsea_odd_411_jpg", "jpeg", turbojpeg_compress(np.asarray(odd), TJPF_RGB, "4:1:1", 90),
         "37×29, 4:1:1 (chroma quartered horizontally)", S("4:1:1")),
        ("chelsea_restart_blocks_jpg", "jpeg", (chelsea, {"quality": 90, "restart_marker_blocks": 3}),
         "4:2:0 with a restart marker every 3 MCUs (not a whole MCU row)", {"restart_interval": 3}),
        ("coffee_restart_rows_jpg", "jpeg", (coffee, {"quality": 90, "subsampling": 1, "restart_marker_rows": 1}),
         "4:2:2 with a restart marker every MCU row", {"restart_interval": 6}),
        ("coffee_progressive_444_jpg", "jpeg", (coffee, {"quality": 90, "progressive": True, "subsampling": 0}),
         "progressive 4:4:4", {"frame": "progressive", **S("4:4:4")}),
        ("coffee_progressive_420_jpg", "jpeg", (coffee, {"quality": 90, "progressive": True, "subsampling": 2}),
         "progressive 4:2:0", {"frame": "progressive", **S("4:2:0")}),
        ("astronaut_optimized_jpg", "jpeg", (astronaut, {"quality": 90, "optimize": True}),
         "optimised Huffman tables", {}),
        ("astronaut_q10_jpg", "jpeg", (astronaut, {"quality": 10}), "quality 10: coarse quantisation, "
         "large coefficients and heavy clamping", {}),
        ("astronaut_q100_jpg", "jpeg", (astronaut, {"quality": 100}), "quality 100: all quantisers 1", {}),
        ("camera_grey_progressive_jpg", "jpeg", (camera_odd, {"quality": 90, "progressive": True}),
         "greyscale progressive, 61×47", {"frame": "progressive", "sampling": ["1x1"]}),
        ("coffee_cmyk_k_jpg", "jpeg", (cmyk_img, {"quality": 90}),
         "CMYK (Adobe marker, inverted) with a real K channel", {"adobe_transform": 0, "sampling": ["1x1"] * 4}),
        ("coffee_ycck_jpg", "jpeg", turbojpeg_compress(255 - cmyk, TJPF_CMYK, "4:2:0", 90),
         "YCCK (Adobe transform 2, inverted CMYK), chroma 4:2:0, K at full resolution",
         {"adobe_transform": 2, "sampling": ["2x2", "1x1", "1x1", "2x2"]}),
        ("chelsea_rgb_jpg", "jpeg", (chelsea, {"quality": 90, "keep_rgb": True}),
         "RGB components without colour transform (Adobe transform 0)",
         {"adobe_transform": 0, **S("4:4:4")}),
        *[(f"astronaut_exif{o}_jpg", "jpeg", (oriented, {"quality": 90, "exif": exif_with_orientation(o)}),
           f"40×30 with EXIF orientation {o}", {}) for o in range(1, 9)],
        ("astronaut_full_jpg", "jpeg", (full("astronaut.png"), {"quality": 90}), "512×512 photograph, 4:2:0", {}),
        ("coffee_full_progressive_jpg", "jpeg", (full("coffee.png"), {"quality": 85, "progressive": True}),
         "600×400 photograph, progressive 4:2:0", {"frame": "progressive"}),
        ("camera_grey16_png", "png", png16(grey16),
         "16-bit grey (Pillow: I;16; convert(\"RGB\") clips each sample to 255)", {}),
        ("astronaut_rgb16_png", "png", png16(rgb16), "16-bit RGB (Pillow keeps the high byte)", {}),
        ("astronaut_rgba16_png", "png", png16(rgba16), "16-bit RGBA (high byte; alpha dropped)", {}),
        ("camera_grey_alpha16_png", "png", png16(la16),
         "16-bit grey+alpha (Pillow: RGBA from the high bytes; alpha dropped)", {}),
    ]
    return specs


def make_images() -> tuple[list[dict], list[dict]]:
    """Writes the encoded inputs; returns the model inputs [{name, file, format}] (the Rust decoder
    must give Pillow's pixels exactly for every one), and the decode-only inputs, which also carry
    `covers`, `pillow_mode` (Image.open's mode before
    convert("RGB")), `exif_orientation` and, for JPEG, `jpeg` (jpeg_layout of the file)."""
    data = skimage_data()
    photo = lambda name, size: Image.open(data / name).convert("RGB").resize(size, Image.LANCZOS)  # noqa: E731
    astronaut = photo("astronaut.png", (96, 96))
    chelsea = photo("chelsea.png", (120, 80))
    coffee = photo("coffee.png", (90, 60))
    rocket = photo("rocket.jpg", (48, 72))
    camera = Image.open(data / "camera.png").convert("L").resize((64, 64), Image.LANCZOS)

    rgba = photo("astronaut.png", (72, 72)).convert("RGBA")
    alpha = np.add.outer(np.arange(72), np.arange(72)) * 255 // 142
    alpha[:8, :8] = 0  # fully transparent, colour kept: convert("RGB") drops alpha, never composites
    rgba.putalpha(Image.fromarray(alpha.astype(np.uint8)))

    band = Image.open(data / "astronaut.png").convert("RGB").crop((0, 200, 512, 264))
    wide = band.resize((300, 40), Image.LANCZOS)
    # Taller than 100x its width: Pillow then resizes vertically first.
    tall = Image.open(data / "coffee.png").convert("RGB").crop((300, 0, 306, 400)).resize((3, 320), Image.LANCZOS)
    tiny = chelsea.resize((5, 3), Image.LANCZOS)
    palette = chelsea.quantize(colors=48, method=Image.Quantize.MEDIANCUT)

    rng = np.random.default_rng(20241127)
    scene_a = Image.fromarray(scenes.draw_scene(rng)[0])
    scene_b = Image.fromarray(scenes.draw_scene(rng)[0])

    specs = [
        ("astronaut_png", "png", astronaut, {}),
        ("chelsea_jpg", "jpeg", chelsea, {"quality": 90}),
        ("coffee_png", "png", coffee, {}),
        ("rocket_progressive_jpg", "jpeg", rocket, {"quality": 85, "progressive": True}),
        ("camera_grey_png", "png", camera, {}),
        ("camera_grey_jpg", "jpeg", camera, {"quality": 90}),
        ("astronaut_rgba_png", "png", rgba, {}),
        ("chelsea_palette_gif", "gif", palette, {}),
        ("chelsea_cmyk_jpg", "jpeg", chelsea.convert("CMYK"), {"quality": 90}),
        ("coffee_exif6_jpg", "jpeg", coffee, {"quality": 90, "exif": exif_with_orientation(6)}),
        ("chelsea_exif3_jpg", "jpeg", chelsea, {"quality": 90, "exif": exif_with_orientation(3)}),
        ("coffee_exif8_png", "png", coffee, {"exif": exif_with_orientation(8)}),
        ("chelsea_exif6_lossy_webp", "webp", chelsea, {"quality": 80, "exif": exif_with_orientation(6)}),
        ("wide_png", "png", wide, {}),
        ("tall_png", "png", tall, {}),
        ("tiny_png", "png", tiny, {}),
        ("scene_a_png", "png", scene_a, {}),
        ("scene_b_png", "png", scene_b, {}),
    ]
    ext = {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp"}
    if IMAGES.exists():
        shutil.rmtree(IMAGES)
    IMAGES.mkdir(parents=True)
    out = []
    for name, fmt, img, opts in specs:
        file = IMAGES / f"{name.rsplit('_', 1)[0]}.{ext[fmt]}"
        img.save(file, fmt.upper(), **opts)
        out.append({"name": name, "file": str(file.relative_to(ROOT)), "format": fmt})

    decode_only = []
    for name, fmt, payload, covers, expect in decode_corpus(data, photo):
        file = IMAGES / f"{name.rsplit('_', 1)[0]}.{ext[fmt]}"
        assert not file.exists(), file
        if isinstance(payload, bytes):
            file.write_bytes(payload)
        else:
            img, opts = payload
            img.save(file, fmt.upper(), **opts)
        encoded = file.read_bytes()
        with Image.open(file) as im:
            entry = {"name": name, "file": str(file.relative_to(ROOT)), "format": fmt,
                     "covers": covers, "pillow_mode": im.mode,
                     "exif_orientation": im.getexif().get(0x0112)}
        if fmt == "jpeg":
            entry["jpeg"] = layout = jpeg_layout(encoded)
            for key, want in expect.items():
                assert layout[key] == want, f"{name}: {key} {layout[key]} != {want}"
            assert bool(layout["restart_interval"]) == bool(layout["restart_markers"]), name
        decode_only.append(entry)
    return out, decode_only


# --------------------------------------------------------------------------------------------
# Random models


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter off its initial constant (LayerNorm 1/0, zero biases) so that a
    missing or swapped tensor shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("norm" in name.lower() or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or p.dim() == 0:
                p.add_(0.1 * noise)


def blip_tokenizer(folder: Path) -> BertTokenizerFast:
    """A small BERT WordPiece tokenizer laid out like the published BLIP one: [PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103, the decoder's bos [DEC] and [ENC] last."""
    words = ("a an the of on in with and is at picture photo cat dog man woman astronaut coffee cup "
             "table rocket sky red blue green white black grey sitting standing flying close up view "
             "large small two").split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab_list = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_list += letters + ["##" + c for c in letters] + [w for w in words if w not in letters] + ["[DEC]", "[ENC]"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    t = BertTokenizerFast(tokenizer_object=tok, bos_token="[DEC]", model_max_length=32)
    t.save_pretrained(folder)
    return t


def copy_tokenizer(src: Path, folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)


def clip_tokenizer_with_eos_at(src: Path, folder: Path, eos_id: int) -> None:
    """The shapes CLIP tokenizer with <|endoftext|> moved to `eos_id`, so that the eos is no longer
    the largest id: pooling at argmax(input_ids) then picks a different position than pooling at the
    first eos, which is what a modern config asks for."""
    t = json.loads((src / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    old = vocab["<|endoftext|>"]
    displaced = next(k for k, v in vocab.items() if v == eos_id)
    vocab[displaced], vocab["<|endoftext|>"] = old, eos_id
    for a in t["added_tokens"]:
        if a["content"] == "<|endoftext|>":
            a["id"] = eos_id
    t["post_processor"]["sep"] = ["<|endoftext|>", eos_id]
    if t.get("padding"):
        t["padding"]["pad_id"] = eos_id
    copy_tokenizer(src, folder)
    (folder / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False))


def save_blip(model: BlipForConditionalGeneration, folder: Path, fmt: str) -> None:
    """fmt: "safetensors" (save_pretrained: the tied decoder weight is left out, as published),
    "safetensors+decoder" (every key, the tied weight included) or "bin" (pytorch_model.bin only)."""
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tied = "text_decoder.cls.predictions.decoder.weight"
    if fmt == "safetensors":
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            assert tied not in f.keys(), "save_pretrained kept the tied decoder weight"
    elif fmt == "safetensors+decoder":
        save_torch_file({k: v.clone() for k, v in state.items()}, path, metadata={"format": "pt"})
    elif fmt == "bin":
        # save_pretrained in transformers 5 only writes safetensors; this is what older
        # checkpoints ship: torch.save of the full state dict (tied weight included).
        path.unlink()
        torch.save({k: v.clone() for k, v in state.items()}, folder / "pytorch_model.bin")
    else:
        raise ValueError(fmt)


def blip_processor(size: int) -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": size, "width": size}, resample=BICUBIC,
                                 do_convert_rgb=True, rescale_factor=1 / 255, image_mean=MEAN, image_std=STD)


def clip_processor(edge: int, crop: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop},
                                 resample=BICUBIC, do_convert_rgb=True, rescale_factor=1 / 255,
                                 image_mean=MEAN, image_std=STD)


def strip_defaults(folder: Path, config_cls) -> None:
    """Rewrites config.json without the tower fields that equal the config classes' defaults, as
    hand-written or older configs are: a loader must then fall back to the same defaults."""
    path = folder / "config.json"
    c = json.loads(path.read_text())
    defaults = config_cls().to_dict()
    for section in ("text_config", "vision_config"):
        for k, v in list(c[section].items()):
            if k != "model_type" and defaults[section].get(k, object()) == v:
                del c[section][k]
    path.write_text(json.dumps(c, indent=2) + "\n")


def build_blip(folder: Path, seed: int, *, vision: dict, text: dict, image_size: int, tokenizer_from: Path | None,
               fmt: str, wrong_encoder_width: bool = False, minimal_config: bool = False) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if tokenizer_from is None:
        tok = blip_tokenizer(folder)
    else:
        copy_tokenizer(tokenizer_from, folder)
        tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.convert_tokens_to_ids
    cfg = BlipConfig(
        vision_config=dict(image_size=image_size, initializer_range=0.1, **vision),
        text_config=dict(vocab_size=len(tok), max_position_embeddings=32, initializer_range=0.1,
                         bos_token_id=ids("[DEC]"), eos_token_id=ids("[SEP]"), sep_token_id=ids("[SEP]"),
                         pad_token_id=ids("[PAD]"), **text),
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg).eval()
    perturb(model, seed)
    save_blip(model, folder, fmt)
    blip_processor(image_size).save_pretrained(folder)
    if wrong_encoder_width:
        # The loader must take the cross-attention width from the vision tower, whatever the text
        # section says (transformers overwrites it the same way).
        c = json.loads((folder / "config.json").read_text())
        c["text_config"]["encoder_hidden_size"] = c["text_config"]["hidden_size"]
        (folder / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    if minimal_config:
        strip_defaults(folder, BlipConfig)


def build_clip(folder: Path, seed: int, *, vision: dict, text: dict, edge: int, crop: int, projection_dim: int,
               tokenizer: str, minimal_config: bool = False) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shapes_clip = ROOT / "models" / "shapes-clip"
    if tokenizer == "legacy":
        # Published legacy layout: config eos 2 (bos 0, pad 1) while the tokenizer's eos is the
        # largest id, which is why argmax(input_ids) finds it.
        copy_tokenizer(shapes_clip, folder)
        special = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    else:
        clip_tokenizer_with_eos_at(shapes_clip, folder, eos_id=300)
        # As in the published configs, the config's pad id (1) is not the tokenizer's pad token:
        # padding must not matter to the pooled output.
        special = dict(bos_token_id=574, eos_token_id=300, pad_token_id=1)
    tok = AutoTokenizer.from_pretrained(folder)
    if tokenizer == "legacy":
        assert tok.eos_token_id == len(tok) - 1
    else:
        assert tok.eos_token_id == 300 and tok.pad_token_id == 300
    cfg = CLIPConfig(
        vision_config=dict(image_size=crop, initializer_range=0.1, **vision),
        text_config=dict(vocab_size=len(tok), max_position_embeddings=24, initializer_range=0.1, **special, **text),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    perturb(model, seed)
    model.save_pretrained(folder)
    clip_processor(edge, crop).save_pretrained(folder)
    if minimal_config:
        strip_defaults(folder, CLIPConfig)


# name -> (builder, kwargs). Sizes keep each folder well under 1.5 MB.
MODELS_SPEC = {
    # Published base layout scaled down; vision and text widths and head counts all differ.
    "blip-base": (build_blip, dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6),
        image_size=96, tokenizer_from=None, fmt="safetensors")),
    # Large layout: vision wider than text, config.json's encoder_hidden_size deliberately stale,
    # the tied decoder weight present in the file, and the shapes tokenizer (sep 3, bos 5).
    "blip-large": (build_blip, dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_size=80, tokenizer_from=ROOT / "models" / "shapes-blip", fmt="safetensors+decoder",
        wrong_encoder_width=True)),
    # Older checkpoints ship pytorch_model.bin only. Its config.json leaves out every field equal to
    # the class default (8 text heads, patch 16, both eps, gelu, the special ids...).
    "blip-bin": (build_blip, dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8),
        image_size=48, tokenizer_from=None, fmt="bin", minimal_config=True)),
    "clip-modern": (build_clip, dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        edge=80, crop=64, projection_dim=24, tokenizer="modern")),
    "clip-legacy": (build_clip, dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        edge=72, crop=56, projection_dim=16, tokenizer="legacy", minimal_config=True)),
}


# --------------------------------------------------------------------------------------------
# Reference outputs


class Store:
    """Collects arrays for one safetensors file."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, key: str, a) -> str:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        assert key not in self.arrays, key
        self.arrays[key] = np.ascontiguousarray(a)
        return key

    def save(self, path: Path) -> None:
        save_file(self.arrays, str(path))


def processor_name(cfg: dict) -> str:
    if cfg.get("do_center_crop"):
        return f"clip_edge{cfg['size']['shortest_edge']}_crop{cfg['crop_size']['height']}"
    return f"blip_{cfg['size']['height']}x{cfg['size']['width']}"


def load_processor(folder: Path, kind: str):
    cls = BlipImageProcessorPil if kind == "blip" else CLIPImageProcessorPil
    return cls.from_pretrained(folder)


def record_processor(proc, pname: str, images: list[dict], loaded: dict, store: Store) -> None:
    """Pillow's resized (and cropped) uint8 pixels of every image, and the reference's
    normalisation of every level as a [3, 256] table; pixel_values == table[c][resized] is checked
    here, so comparing with the table is comparing with the reference's pixel_values."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ramp = Image.fromarray(np.stack([levels] * 3, axis=-1))
    table = proc(ramp, do_resize=False, do_center_crop=False, return_tensors="np")["pixel_values"][0].reshape(3, 256)
    store.put(f"{pname}.levels", table.astype(np.float32))
    for im in images:
        img = loaded[im["name"]]
        resized = proc(img, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        assert resized.dtype == np.uint8, resized.dtype
        pv = proc(img, return_tensors="np")["pixel_values"][0]
        assert np.array_equal(pv, table[np.arange(3)[:, None, None], resized]), "normalisation is not per level"
        store.put(f"{pname}.resized.{im['name']}", resized.transpose(1, 2, 0))


class MarginError(Exception):
    """A random model's greedy step is too close to call; the model is re-drawn."""


def margins(logits: torch.Tensor) -> float:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def greedy(model, pv: torch.Tensor, prompt_ids: torch.Tensor | None = None):
    kw = dict(max_length=MAX_LENGTH, min_length=0, do_sample=False, num_beams=1, repetition_penalty=1.0,
              output_logits=True, return_dict_in_generate=True)
    if prompt_ids is not None:
        kw.update(input_ids=prompt_ids.clone(), attention_mask=torch.ones_like(prompt_ids))
    out = model.generate(pixel_values=pv, **kw)
    ids = out.sequences[0]
    logits = torch.stack(out.logits)[:, 0, :]
    # Sanity: no other logits processor is active, so each token is the argmax of its raw logits.
    assert torch.equal(logits.argmax(-1), ids[ids.shape[0] - logits.shape[0]:])
    return ids.tolist(), logits, margins(logits)


def sampling_rows(model_entry: dict, histories: list[list[int]], raw: torch.Tensor, eos: int, store: Store,
                  prefix: str) -> None:
    """The reference's processed scores after each sampling processor, applied in generate's order
    to recorded logits. Rows run one at a time: their histories differ in length."""
    params = dict(repetition_penalty=1.3, min_length=4, temperature=0.7, top_k=5, top_p=0.8)
    chain = [
        ("repetition_penalty", RepetitionPenaltyLogitsProcessor(params["repetition_penalty"])),
        ("min_length", MinLengthLogitsProcessor(params["min_length"], eos)),
        ("temperature", TemperatureLogitsWarper(params["temperature"])),
        ("top_k", TopKLogitsWarper(params["top_k"])),
        ("top_p", TopPLogitsWarper(params["top_p"])),
    ]
    stages = {name: [] for name, _ in chain}
    for h, scores in zip(histories, raw):
        ids = torch.tensor([h])
        s = scores[None].clone()
        for name, proc in chain:
            s = proc(ids, s)
            stages[name].append(s[0])
    model_entry["sampling"] = {
        "params": params,
        "histories": histories,
        "raw": store.put(f"{prefix}.raw", raw),
        "stages": [[name, store.put(f"{prefix}.{name}", torch.stack(v))] for name, v in stages.items()],
    }


def record_blip(name: str, folder: Path, images: list[dict], loaded: dict, model_images: list[str],
                prompt: str, strict_margins: bool) -> tuple[dict, Store]:
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    proc = load_processor(folder, "blip")
    tok = AutoTokenizer.from_pretrained(folder)
    tc = model.config.text_config
    store = Store()
    entry = {"name": name, "kind": "blip", "folder": str(folder.relative_to(ROOT)),
             "processor": processor_name(proc.to_dict()), "bos": tc.bos_token_id, "sep": tc.sep_token_id,
             "max_length": MAX_LENGTH, "images": model_images}
    pixels = lambda n: torch.from_numpy(proc(loaded[n], return_tensors="np")["pixel_values"])  # noqa: E731
    with torch.no_grad():
        pv = torch.cat([pixels(n) for n in model_images])
        store.put("pixel_values", pv)
        embeds = model.vision_model(pixel_values=pv)[0]
        entry["embeds_tokens"] = min(EMBEDS_TOKENS, embeds.shape[1])
        store.put("image_embeds", embeds[:, : entry["embeds_tokens"]])

        enc = tok(prompt, return_tensors="pt")
        prompt_ids = enc["input_ids"]
        prefix = [tc.bos_token_id] + prompt_ids[0, 1:-1].tolist()
        entry["prompt"] = {"text": prompt, "tokenizer_ids": prompt_ids[0].tolist(), "prefix": prefix}
        for mode, p in (("greedy", None), ("prompt", prompt_ids)):
            runs = []
            for i, n in enumerate(model_images):
                ids, logits, margin = greedy(model, pv[i : i + 1], p)
                if strict_margins and margin < MIN_MARGIN:
                    raise MarginError(f"{name} {mode} {n}: margin {margin:.2e}")
                runs.append({"image": n, "ids": ids, "min_margin": margin,
                             "text": tok.decode(ids, skip_special_tokens=True),
                             "logits": store.put(f"{mode}.logits.{i}", logits)})
            if mode == "greedy":
                entry["greedy"] = runs
            else:
                entry["prompt"]["runs"] = runs

        # Every input, end to end from its file (ids only; compared where margins allow).
        entry["greedy_all"] = []
        for im in images:
            ids, logits, margin = greedy(model, pixels(im["name"]))
            entry["greedy_all"].append({"image": im["name"], "ids": ids, "min_margin": margin})

        # Beam search is not implemented on the Rust side yet: recorded for a later test.
        entry["beam"] = []
        for lp in (1.0, 0.6):
            for es in (False, True):
                for i, n in enumerate(model_images):
                    out = model.generate(pixel_values=pv[i : i + 1], max_length=MAX_LENGTH, num_beams=3,
                                         num_return_sequences=3, length_penalty=lp, early_stopping=es,
                                         do_sample=False, output_scores=True, return_dict_in_generate=True)
                    entry["beam"].append({"image": n, "num_beams": 3, "length_penalty": lp, "early_stopping": es,
                                          "sequences": out.sequences.tolist(),
                                          "sequence_scores": out.sequences_scores.tolist()})

        # Sampling processors on recorded logits: steps 0, 2 and 4 of the first greedy run
        # (histories of length 1, 3, 5, so min_length 4 suppresses eos in the first two), the prompt
        # run's first step, and a coarsely rounded copy of step 2 whose ties top-k must keep.
        g, pr = entry["greedy"][0], entry["prompt"]["runs"][0]
        gl, pl = store.arrays[g["logits"]], store.arrays[pr["logits"]]
        steps = [s for s in (0, 2, 4) if s < len(gl)]
        histories = [g["ids"][: 1 + s] for s in steps] + [prefix]
        raw = [torch.from_numpy(gl[s]) for s in steps] + [torch.from_numpy(pl[0])]
        histories.append(g["ids"][:3])
        raw.append(torch.round(torch.from_numpy(gl[min(2, len(gl) - 1)]) * 2) / 2)
        sampling_rows(entry, histories, torch.stack(raw), tc.sep_token_id, store, "sampling")
    return entry, store


CLIP_CAPTIONS = {
    "photos": [
        "a photo of a cat",
        "An astronaut in a white suit.",
        "a cup of coffee on a wooden table",
        "a rocket launching into the sky",
        "a black and white photo of a man with a camera",
        "a very long caption that keeps going and going so that it has to be cut to the text tower's positions",
    ],
    "shapes": [
        "a small red circle on a white background",
        "a large blue square on a black background",
        "a small green triangle and a large yellow circle on a gray background",
        "a large purple triangle on a white background",
        "a small orange square and a small red triangle on a black background",
        "A photo of a CAT, sitting!",
    ],
}


def record_clip(name: str, folder: Path, images: list[dict], loaded: dict, model_images: list[str],
                captions: list[str]) -> tuple[dict, Store]:
    model = CLIPModel.from_pretrained(folder).eval()
    proc = load_processor(folder, "clip")
    tok = AutoTokenizer.from_pretrained(folder)
    tc = model.config.text_config
    store = Store()
    enc = tok(captions, padding=True, truncation=True, max_length=tc.max_position_embeddings, return_tensors="pt")
    # The Rust side loads tokenizer.json with the `tokenizers` crate: it must be what transformers uses.
    raw_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw_tok.no_padding()
    raw_tok.enable_truncation(tc.max_position_embeddings)
    for row, mask, c in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), captions):
        assert row[: sum(mask)] == raw_tok.encode(c).ids, (c, row, raw_tok.encode(c).ids)
    pixels = lambda n: torch.from_numpy(proc(loaded[n], return_tensors="np")["pixel_values"])  # noqa: E731
    entry = {"name": name, "kind": "clip", "folder": str(folder.relative_to(ROOT)),
             "processor": processor_name(proc.to_dict()), "images": model_images, "captions": captions,
             "input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist(),
             "eos_token_id": tc.eos_token_id, "pad_token_id": tc.pad_token_id,
             "max_positions": tc.max_position_embeddings}
    with torch.no_grad():
        pv = torch.cat([pixels(n) for n in model_images])
        store.put("pixel_values", pv)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv)
        store.put("image_embeds", out.image_embeds)
        store.put("text_embeds", out.text_embeds)
        store.put("logits_per_image", out.logits_per_image)
        entry["all_images"] = [im["name"] for im in images]
        pv_all = torch.cat([pixels(im["name"]) for im in images])
        out_all = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv_all)
        store.put("logits_per_image_all", out_all.logits_per_image)
    return entry, store


def main() -> None:
    check_environment()
    images, decode_images = make_images()
    loaded = {im["name"]: load_image(str(ROOT / im["file"])) for im in images + decode_images}

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for f in FIXTURES.glob("*.safetensors"):
        f.unlink()
    entries = []

    # Random models first, re-drawn until their greedy decisions are unambiguous; the embedded
    # shapes models last (they are retrained independently, and are used as they are).
    blip_runs = {
        "blip-base": (["chelsea_jpg", "coffee_png", "tiny_png"], "a picture of"),
        "blip-large": (["astronaut_png", "wide_png", "tall_png"], "a large"),
        "blip-bin": (["coffee_exif6_jpg", "camera_grey_png", "astronaut_rgba_png"], "a photo of"),
    }
    clip_runs = {
        "clip-modern": ["chelsea_jpg", "astronaut_png", "tall_png"],
        "clip-legacy": ["coffee_png", "rocket_progressive_jpg", "wide_png"],
    }
    for name, (build, kw) in MODELS_SPEC.items():
        folder = MODELS / name
        for seed in range(1, 50):
            build(folder, seed, **kw)
            try:
                if build is build_blip:
                    imgs, prompt = blip_runs[name]
                    entry, store = record_blip(name, folder, images, loaded, imgs, prompt, strict_margins=True)
                else:
                    entry, store = record_clip(name, folder, images, loaded, clip_runs[name], CLIP_CAPTIONS["photos"])
                break
            except MarginError as e:
                print(f"re-drawing {name}: {e}")
        else:
            raise SystemExit(f"{name}: no seed gives clear greedy margins")
        entry["seed"] = seed
        entries.append((entry, store))

    shapes = ROOT / "models"
    entries.append(record_blip("shapes-blip", shapes / "shapes-blip", images, loaded,
                               ["scene_a_png", "scene_b_png", "astronaut_png"], "a large", strict_margins=False))
    entries.append(record_clip("shapes-clip", shapes / "shapes-clip", images, loaded,
                               ["scene_a_png", "scene_b_png", "chelsea_jpg"], CLIP_CAPTIONS["shapes"]))

    # Pixels: every input's decoded RGB; one table per distinct processor (model inputs only).
    pixel_store = Store()
    for im in images + decode_images:
        pixel_store.put(f"decoded.{im['name']}", np.asarray(loaded[im["name"]]))
    processors_json = {}
    for entry, _ in entries:
        folder = ROOT / entry["folder"]
        pname = entry["processor"]
        if pname in processors_json:
            continue
        processors_json[pname] = json.loads((folder / "preprocessor_config.json").read_text())
        record_processor(load_processor(folder, entry["kind"]), pname, images, loaded, pixel_store)
    pixel_store.save(FIXTURES / "pixels.safetensors")

    for entry, store in entries:
        entry["fixture"] = f"tests/parity/fixtures/{entry['name']}.safetensors"
        store.save(ROOT / entry["fixture"])
        # Lets the tests tell a stale fixture (a retrained embedded model) from a regression.
        folder = ROOT / entry["folder"]
        entry["sha256"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                           for f in sorted(folder.iterdir()) if f.is_file()}

    manifest = {
        "generated_by": "tests/parity/make_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "Pillow": PIL.__version__,
                     "libjpeg_turbo": features.version_feature("libjpeg_turbo"), "numpy": np.__version__},
        "images": images,
        # Only decoded (`decoded.<name>` in pixels.safetensors); no model or processor sees them.
        "decode_images": decode_images,
        "pixels": "tests/parity/fixtures/pixels.safetensors",
        "processors": processors_json,
        "models": [e for e, _ in entries],
    }
    (FIXTURES / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for d in (IMAGES, MODELS, FIXTURES) for f in d.rglob("*") if f.is_file())
    print(f"wrote {len(images)} model and {len(decode_images)} decode-only images, {len(entries)} model cases; "
          f"{total / 1e6:.2f} MB under tests/parity")


if __name__ == "__main__":
    main()
