"""Tokenizers of the multimodal token space, on the shipped Fashion-MNIST images and spoken clips (tests/data)."""

import csv
import wave
from pathlib import Path

import numpy as np
import pytest

from soma_lightning.data_modules.modalities import TokenSpace, decode_to_files, framed, prompt, segments, text_ids
from soma_lightning.data_modules.tokenizers import (
    AudioConfig, AudioTokenizer, ImageConfig, ImageTokenizer, _nearest, kmeans, mulaw_decode, mulaw_encode, read_wav, resample, write_wav,
)
from soma_lightning.errors import SpecError

RANGES = {"bytes": [0, 256], "specials": [256, 264], "markers": [264, 280], "code": [280, 536], "image": [536, 792], "audio": [792, 1048]}
IMAGES = sorted(Path("tests/data/fashion_mnist").rglob("*.png"))
CLIPS = sorted(Path("tests/data/speech").glob("*.wav"))
SPACE = TokenSpace(RANGES)


def test_shipped_samples_are_there():
    assert len(IMAGES) == 9 and len(CLIPS) == 5


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pixel_tokens_are_lossless_at_256_levels(tmp_path, mode):
    tok = ImageTokenizer(ImageConfig(mode=mode), SPACE)
    for path in IMAGES:
        pixels = tok.read(path)
        tokens = tok.encode(pixels)
        rows = np.split(tokens, np.flatnonzero(tokens == SPACE.marker("image_row")) + 1)[:-1]
        assert len(rows) == 28 and all(len(r) == 28 * tok.channels + 1 for r in rows)
        assert ((tokens >= 536) & (tokens < 792) | (tokens == SPACE.marker("image_row"))).all()
        tok.save_png(tokens, tmp_path / "x.png")
        assert np.array_equal(tok.read(tmp_path / "x.png"), pixels)
        assert np.array_equal(tok.encode(tok.read(tmp_path / "x.png")), tokens)


def test_quantised_and_resized_pixels_round_trip_within_half_a_level(tmp_path):
    tok = ImageTokenizer(ImageConfig(height=14, width=14, levels=16), SPACE)
    for path in IMAGES:
        pixels = tok.read(path)
        assert pixels.shape == (14, 14, 1)
        tokens = tok.encode(pixels)
        assert (np.abs(tok.decode(tokens).astype(int) - pixels) <= 8).all()  # bins of 16, decoded to their centre
        tok.save_png(tokens, tmp_path / "x.png")
        assert np.array_equal(tok.encode(tok.read(tmp_path / "x.png")), tokens)


def test_nearest_centroid_equals_the_plain_argmin():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(1000, 16)).astype(np.float32), rng.normal(size=(37, 16)).astype(np.float32)
    plain = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(_nearest(x, c, chunk=64), plain)


def test_vq_codebook_is_deterministic_and_round_trips(tmp_path):
    config = ImageConfig(patch=4, codebook_size=32, kmeans_iters=10)
    images = [ImageTokenizer(config, SPACE).read(p) for p in IMAGES]
    a, b = ImageTokenizer(config, SPACE), ImageTokenizer(config, SPACE)
    a.fit(images[:6], seed=1)
    b.fit(images[:6], seed=1)
    assert np.array_equal(a.codebook, b.codebook)
    errors, baseline = [], []
    for pixels in images[6:]:  # held-out images
        tokens = a.encode(pixels)
        assert len(tokens) == 7 * 8 and ((tokens - 536 < 32) | (tokens == SPACE.marker("image_row"))).all()
        a.save_png(tokens, tmp_path / "x.png")
        assert np.array_equal(a.encode(a.read(tmp_path / "x.png")), tokens)
        errors.append(np.abs(a.decode(tokens).astype(float) - pixels).mean())
        baseline.append(np.abs(pixels - pixels.mean()).mean())
    assert np.mean(errors) < 0.6 * np.mean(baseline)


def test_kmeans_needs_enough_distinct_patches():
    with pytest.raises(Exception, match="only 2 distinct patches"):
        kmeans(np.array([[0.0], [0.0], [1.0]]), 3, 5, 0)


def test_image_config_errors_name_the_key():
    with pytest.raises(SpecError, match="data.image.patch: 5 must divide"):
        ImageTokenizer(ImageConfig(patch=5), SPACE)
    small = TokenSpace({"bytes": [0, 256], "specials": [256, 264], "markers": [264, 280], "image": [280, 296]})
    with pytest.raises(SpecError, match=r"vocab_ranges.image: \[280, 296\) holds 16 ids; image levels need 256"):
        ImageTokenizer(ImageConfig(), small)
    with pytest.raises(SpecError, match="vocab_ranges.audio: not declared"):
        AudioTokenizer(AudioConfig(), small)


def test_real_clips_read_at_their_rate_and_length():
    durations = {r["file_name"]: float(r["duration_s"]) for r in csv.DictReader(open("tests/data/speech/metadata.csv"))}
    for clip in CLIPS:
        samples, rate = read_wav(clip)
        assert rate == 8000 and abs(len(samples) / rate - durations[clip.name]) < 0.002
        assert 0.05 < np.abs(samples).max() <= 1.0


def test_mulaw_error_stays_inside_the_quantisation_bin():
    samples = np.concatenate([read_wav(c)[0] for c in CLIPS] + [np.random.default_rng(0).uniform(-1, 1, 10000)])
    codes = mulaw_encode(samples)
    assert codes.min() >= 0 and codes.max() <= 255
    decoded = mulaw_decode(codes)
    lower, upper = mulaw_decode(codes - 0.5), mulaw_decode(codes + 0.5)
    assert ((samples >= lower - 1e-12) & (samples <= upper + 1e-12)).all()  # x lies in its code's bin
    assert (np.abs(decoded - samples) <= np.maximum(upper - decoded, decoded - lower) + 1e-12).all()
    assert np.abs(decoded - samples).max() < 0.032  # the widest bin, at full scale: about 1/32
    small = np.abs(samples) < 0.01
    # fine steps near zero: at |x| = 0.01 half a step is ln(256) 256^y / 255 / 255 = 3.0e-4 (y = 0.2285)
    assert np.abs(decoded - samples)[small].max() < 3.1e-4


def test_audio_tokens_round_trip_exactly_through_a_wav_file(tmp_path):
    tok = AudioTokenizer(AudioConfig(), SPACE)
    for clip in CLIPS:
        tokens = tok.encode(*read_wav(clip))
        assert ((tokens >= 792) & (tokens < 1048)).all()
        tok.save_wav(tokens, tmp_path / "x.wav")
        again, rate = read_wav(tmp_path / "x.wav")
        assert rate == 8000 and np.array_equal(tok.encode(again, rate), tokens)


def test_resampling_keeps_the_band_and_removes_what_would_alias():
    t = np.arange(8000) / 8000
    low, high = np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 1500 * t)
    down = resample(low, 8000, 2000)
    assert len(down) == 2000
    inner = slice(100, -100)
    assert np.abs(down - np.sin(2 * np.pi * 200 * np.arange(2000) / 2000))[inner].max() < 0.02
    assert np.abs(resample(high, 8000, 2000))[inner].max() < 0.05  # 1.5 kHz is above the new 1 kHz Nyquist
    up = resample(np.sin(2 * np.pi * 300 * t), 8000, 16000)
    assert np.abs(up - np.sin(2 * np.pi * 300 * np.arange(16000) / 16000))[inner].max() < 0.01


def test_other_wav_layouts_and_bad_files(tmp_path):
    x = 0.5 * np.sin(np.linspace(0, 20, 400))
    pcm = np.clip(np.rint(x * 2**23), -(2**23), 2**23 - 1).astype("<i4")
    stereo24 = np.stack([pcm, pcm], 1).reshape(-1)
    raw = np.stack([(stereo24 >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8).tobytes()
    with wave.open(str(tmp_path / "s24.wav"), "wb") as f:
        f.setnchannels(2), f.setsampwidth(3), f.setframerate(16000), f.writeframes(raw)
    samples, rate = read_wav(tmp_path / "s24.wav")
    assert rate == 16000 and np.abs(samples - x).max() < 1e-6
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    truncated = tmp_path / "short.wav"
    truncated.write_bytes(CLIPS[0].read_bytes()[:3000])
    for bad in ("junk.wav", "short.wav", "missing.wav"):
        with pytest.raises(Exception, match=f"{bad}: (unreadable|corrupt) WAV"):
            read_wav(tmp_path / bad)
    write_wav(tmp_path / "w.wav", x, 8000)
    assert np.abs(read_wav(tmp_path / "w.wav")[0] - x).max() <= 0.5 / 32768


def test_a_sequence_decodes_to_text_png_and_wav(tmp_path):
    image, audio = ImageTokenizer(ImageConfig(), SPACE), AudioTokenizer(AudioConfig(), SPACE)
    pixels, (samples, rate) = image.read(IMAGES[0]), read_wav(CLIPS[0])
    clip = audio.encode(samples, rate)
    code = "def f():\n    return 1\n"
    tokens = np.concatenate([
        framed(SPACE, "text", text_ids("Sneaker")), framed(SPACE, "image", image.encode(pixels)),
        framed(SPACE, "code", text_ids(code) + SPACE.code_offset()), prompt(SPACE, "one", "audio"), clip,  # no end marker
    ])
    assert [k for k, _ in segments(tokens, SPACE)] == ["text", "image", "code", "text", "audio"]
    files = decode_to_files(tokens, SPACE, image, audio, tmp_path)
    assert [f.name for f in files] == ["00_text.txt", "01_image.png", "02_code.txt", "03_text.txt", "04_audio.wav"]
    assert files[0].read_text() == "Sneaker" and files[2].read_text() == code and files[3].read_text() == "one"
    assert np.array_equal(image.read(files[1]), pixels)
    assert np.array_equal(audio.encode(*read_wav(files[4])), clip)
