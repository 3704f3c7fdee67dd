"""The encoder artifact and Encoder: round trip, any image size and mode, clear errors."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoder import Encoder
from encoder.backbone import build_backbone
from encoder.checkpoint import CONFIG, write_artifact
from encoder.config import ArchConfig, TrainConfig, preset

ARCH = ArchConfig(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(ARCH)
    write_artifact(str(tmp_path), model.state_dict(), ARCH, {"generators": ["shader"], "seed": 0})
    return str(tmp_path), model


def test_round_trip_gives_same_embeddings(checkpoint):
    url, model = checkpoint
    enc = Encoder.load(url, device="cpu")
    images = torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8)
    z = enc.embed(images)
    assert z.shape == (5, 24) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-5)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval()(enc.preprocess(images)), dim=-1).numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)
    assert enc.provenance["generators"] == ["shader"]
    assert enc.embed_patches(images).shape == (5, 4, 4, 24)


def test_any_size_and_mode(checkpoint):
    enc = Encoder.load(checkpoint[0], device="cpu")
    grey = np.zeros((40, 30), np.uint8)
    rgba = np.full((9, 50, 4), 200, np.uint8)
    pil = Image.new("P", (17, 23))
    z = enc.embed([grey, rgba, pil])
    assert z.shape == (3, 24)
    with pytest.raises(ValueError, match="shape"):
        enc.embed([np.zeros((4, 4, 2, 2), np.uint8)])


def test_raw_pixels_and_random_init_share_the_interface():
    raw = Encoder.load("raw-pixels:8", device="cpu")
    z = raw.embed(torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8))
    assert z.shape == (3, 192)
    np.testing.assert_allclose(z.sum(1), 0, atol=1e-4)          # per-image centred
    a = Encoder.load("random-init:tiny-cpu:1", device="cpu")
    b = Encoder.load("random-init:tiny-cpu:1", device="cpu")
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    np.testing.assert_array_equal(a.embed(x), b.embed(x))
    assert a.dim == 16 * preset("tiny-cpu").arch.embed_dim           # its 4×4 grid readout


def test_colour_histogram_sees_colour_and_no_layout():
    hist = Encoder.load("colour-histogram:4", device="cpu")
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = (250, 10, 10)                  # left half red, right half black
    flipped = half[:, ::-1].copy()                # the same colours elsewhere
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[:, :16] = (10, 10, 250)
    z = hist.embed([half, flipped, blue])
    assert z.shape == (3, 64) and hist.dim == 64
    assert z[0] @ z[1] == pytest.approx(1.0, abs=1e-6)         # layout does not matter
    assert z[0] @ z[2] == pytest.approx(0.5, abs=1e-6)         # the black half is shared, the colour is not
    with pytest.raises(ValueError, match="no patch embeddings"):
        hist.embed_patches([half])
    with pytest.raises(ValueError, match="colour-histogram:x: BINS"):
        Encoder.load("colour-histogram:x")


def test_bad_checkpoints_name_the_file(checkpoint, tmp_path_factory):
    url, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="no encoder checkpoint"):
        Encoder.load(url + "/missing")
    config = json.loads(open(f"{url}/{CONFIG}").read())
    del config["embed_dim"]
    open(f"{url}/{CONFIG}", "w").write(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: missing field.*embed_dim"):
        Encoder.load(url)
    config["embed_dim"], config["depth"] = 24, 3
    open(f"{url}/{CONFIG}", "w").write(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config.json"):
        Encoder.load(url)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Encoder.load("random-init:huge")


def test_decode_any_mode():
    from encoder.embed import decode_image
    for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (5, 7)).save(buf, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
        assert decode_image(buf.getvalue()).shape == (7, 5, 3)
    with pytest.raises(Exception):
        decode_image(b"not an image")


def test_train_config_round_trip():
    cfg = preset("vit-s16", workers=7)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.arch.patch_size == 16 and cfg.workers == 7
