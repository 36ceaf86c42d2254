"""Reversible tokenizers into the token space's `image` and `audio` ranges: images as quantised pixels or
k-means patch codes, audio as mu-law codes; and the WAV reading and writing they use."""

import io
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.modalities import BadInput, TokenSpace
from soma_lightning.errors import SpecError, UserError

MU = 255  # mu-law, 8 bits


# ---------------------------------------------------------------- images


@dataclass
class ImageConfig:
    """Images -> ids in the `image` range. Each image is converted to `mode` (L grayscale or RGB) and resized
    to `height` x `width` (bilinear; not touched when already that size).
    Pixel mode (`patch` null): each pixel's intensity, RGB channels interleaved, quantised to `levels` bins
    (v * levels // 256; decoded to the bin centre, so levels 256 is lossless), raster order, an image_row
    marker after each row. VQ mode (`patch` p): each p x p patch becomes the index of its nearest of
    `codebook_size` k-means centroids (fitted at prepare time on up to `fit_patches` training patches,
    `kmeans_iters` Lloyd iterations, seeded), a row marker after each row of patches."""

    height: int = 28
    width: int = 28
    mode: Literal["L", "RGB"] = "L"
    levels: int = 256
    patch: int | None = None
    codebook_size: int = 256
    fit_patches: int = 100_000
    kmeans_iters: int = 25


def _nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean) for each row of x, in chunks to bound memory."""
    c2 = (centroids**2).sum(1)
    return np.concatenate([(c2 - 2 * x[i : i + chunk] @ centroids.T).argmin(1) for i in range(0, len(x), chunk)])


def kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """[k, d] float32 centroids by Lloyd's algorithm from k distinct rows picked with `seed`; a centroid that
    loses all its points moves to the point farthest from its own centroid. Deterministic."""
    x = x.astype(np.float32)
    distinct = np.unique(x, axis=0)
    if len(distinct) < k:
        raise UserError(f"image.codebook_size: {k} codes, but the training images have only {len(distinct)} distinct patches")
    rng = np.random.default_rng(seed)
    centroids = distinct[np.sort(rng.choice(len(distinct), size=k, replace=False))]
    for _ in range(iters):
        assign = _nearest(x, centroids)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if not filled.all():
            error = ((x - centroids[assign]) ** 2).sum(1)
            centroids[~filled] = x[np.argsort(-error, kind="stable")[: int((~filled).sum())]]
    return centroids


class ImageTokenizer:
    """ImageConfig's tokenizer; `codebook` [codebook_size, patch * patch * channels] for VQ mode."""

    def __init__(self, config: ImageConfig, space: TokenSpace, codebook: np.ndarray | None = None) -> None:
        c = config
        if min(c.height, c.width) < 1:
            raise SpecError(f"data.image: height and width must be positive, got {c.height} x {c.width}")
        if not 2 <= c.levels <= 256:
            raise SpecError(f"data.image.levels: must be in 2..256, got {c.levels}")
        if c.patch is not None and (c.patch < 1 or c.height % c.patch or c.width % c.patch):
            raise SpecError(f"data.image.patch: {c.patch} must divide height {c.height} and width {c.width}")
        space.need("image", c.levels if c.patch is None else c.codebook_size, "image levels" if c.patch is None else "image codebook entries")
        self.config, self.space, self.codebook = c, space, codebook
        self.channels = 1 if c.mode == "L" else 3
        self.start, self.row = space.start("image"), space.marker("image_row")

    def pixels(self, image) -> np.ndarray:
        """A PIL image -> uint8 [height, width, channels]."""
        from PIL import Image

        image = image.convert(self.config.mode)
        if image.size != (self.config.width, self.config.height):
            image = image.resize((self.config.width, self.config.height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).reshape(self.config.height, self.config.width, self.channels)

    def read(self, path: str | Path, data: bytes | None = None) -> np.ndarray:
        """Pixels of an image file (or of its bytes); BadInput naming the file if it cannot be decoded."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                image.load()
                return self.pixels(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadInput(f"{path}: unreadable image ({type(e).__name__}: {e})") from None

    def patches(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, C] -> [H/p, W/p, p*p*C] float32, patches in raster order."""
        p, (h, w, ch) = self.config.patch, pixels.shape
        return pixels.reshape(h // p, p, w // p, p, ch).transpose(0, 2, 1, 3, 4).reshape(h // p, w // p, p * p * ch).astype(np.float32)

    def fit(self, images: list[np.ndarray], seed: int) -> None:
        """VQ mode: fit the codebook on up to fit_patches patches of these (training) images."""
        c = self.config
        patches = np.concatenate([self.patches(im).reshape(-1, c.patch * c.patch * self.channels) for im in images])
        if len(patches) > c.fit_patches:
            patches = patches[np.sort(np.random.default_rng(seed).choice(len(patches), c.fit_patches, replace=False))]
        self.codebook = kmeans(patches, c.codebook_size, c.kmeans_iters, seed)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] -> ids: one row of values (pixel levels or patch codes) then image_row, per row."""
        if self.config.patch is None:
            grid = (pixels.astype(np.int64) * self.config.levels // 256).reshape(pixels.shape[0], -1)
        else:
            if self.codebook is None:
                raise RuntimeError("ImageTokenizer.encode in VQ mode before fit()")
            grid_patches = self.patches(pixels)
            grid = _nearest(grid_patches.reshape(-1, grid_patches.shape[-1]), self.codebook).reshape(grid_patches.shape[:2])
        rows = np.concatenate([grid + self.start, np.full((grid.shape[0], 1), self.row)], axis=1)
        return rows.reshape(-1)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """ids (row markers included, begin/end markers and other ids ignored) -> uint8 [H, W, C]. Lenient for
        generated sequences: rows are cut or zero-padded to the width, missing rows are zero."""
        c = self.config
        p = c.patch or 1
        grid_h, row_len = c.height // p, (c.width * self.channels if c.patch is None else c.width // p)
        size = c.levels if c.patch is None else c.codebook_size
        grid = np.zeros((grid_h, row_len), dtype=np.int64)
        rows = np.split(tokens, np.flatnonzero(tokens == self.row))
        for i, row in enumerate(rows[:grid_h]):
            values = row[(row >= self.start) & (row < self.start + size)] - self.start
            grid[i, : min(len(values), row_len)] = values[:row_len]
        if c.patch is None:
            levels = (grid * 256 + 128) // c.levels  # bin centres
            return levels.clip(0, 255).astype(np.uint8).reshape(c.height, c.width, self.channels)
        patches = self.codebook[grid].reshape(grid_h, c.width // p, p, p, self.channels)
        return patches.transpose(0, 2, 1, 3, 4).reshape(c.height, c.width, self.channels).round().clip(0, 255).astype(np.uint8)

    def save_png(self, tokens: np.ndarray, path: Path) -> None:
        from PIL import Image

        pixels = self.decode(tokens)
        image = Image.fromarray(pixels[..., 0] if self.channels == 1 else pixels, self.config.mode)
        atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------- audio


@dataclass
class AudioConfig:
    """Audio -> ids in the `audio` range: mixed to mono, resampled to `sample_rate` (see `resample`),
    mu-law companded (mu 255) and quantised to 256 codes; clips longer than `max_seconds` are cut there."""

    sample_rate: int = 8000
    max_seconds: float | None = None


def mulaw_encode(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] (clipped) -> codes 0..255: y = sign(x) ln(1 + mu|x|) / ln(1 + mu), round((y + 1) / 2 * 255)."""
    x = np.clip(x, -1.0, 1.0)
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / math.log1p(MU)
    return np.rint((y + 1) / 2 * 255).astype(np.int64)


def mulaw_decode(codes: np.ndarray) -> np.ndarray:
    """Codes (real-valued allowed, for bin edges) -> samples: the inverse companding of each code's centre."""
    y = np.asarray(codes, dtype=np.float64) / 255 * 2 - 1
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(MU)) / MU


def resample(x: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Linear interpolation at the new sample times; when downsampling, first a low-pass at the new Nyquist
    frequency (a Hann-windowed sinc, 8 zero crossings each side) so that higher frequencies do not alias."""
    if rate == new_rate or len(x) == 0:
        return x
    if new_rate < rate:
        cutoff = new_rate / rate / 2  # cycles per input sample
        half = int(math.ceil(8 / (2 * cutoff)))
        n = np.arange(-half, half + 1)
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hanning(len(n) + 2)[1:-1]
        x = np.convolve(x, taps / taps.sum(), mode="same")
    t = np.arange(int(len(x) * new_rate / rate)) * (rate / new_rate)
    return np.interp(t, np.arange(len(x)), x)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """PCM WAV (8, 16, 24 or 32 bit) -> (float64 mono samples in [-1, 1), sample rate), channels averaged;
    BadInput naming the file if it is missing, not a PCM WAV, truncated or empty."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate, n = f.getsampwidth(), f.getnchannels(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except (OSError, EOFError, wave.Error) as e:
        raise BadInput(f"{path}: unreadable WAV ({type(e).__name__}: {e})") from None
    if n == 0 or len(raw) != n * width * channels:
        raise BadInput(f"{path}: corrupt WAV: header says {n} frames of {width * channels} bytes, data holds {len(raw)} bytes")
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128) / 128
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8) / 2.0**23
    else:
        samples = np.frombuffer(raw, dtype={2: "<i2", 4: "<i4"}[width]).astype(np.float64) / 2.0 ** (8 * width - 1)
    return samples.reshape(-1, channels).mean(axis=1), rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV, written atomically; the scale is read_wav's (x * 32768, clipped)."""
    pcm = np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2").tobytes()

    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(pcm)

    atomic_write(Path(path), write)


class AudioTokenizer:
    def __init__(self, config: AudioConfig, space: TokenSpace) -> None:
        if config.sample_rate < 1:
            raise SpecError(f"data.audio.sample_rate: must be positive, got {config.sample_rate}")
        if config.max_seconds is not None and config.max_seconds <= 0:
            raise SpecError(f"data.audio.max_seconds: must be positive, got {config.max_seconds}")
        space.need("audio", 256, "8-bit mu-law codes")
        self.config, self.start = config, space.start("audio")

    def encode(self, samples: np.ndarray, rate: int) -> np.ndarray:
        x = resample(samples, rate, self.config.sample_rate)
        if self.config.max_seconds is not None:
            x = x[: int(self.config.max_seconds * self.config.sample_rate)]
        return mulaw_encode(x) + self.start

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """ids -> samples at sample_rate; ids outside the 256 audio ids (markers) are ignored."""
        codes = tokens[(tokens >= self.start) & (tokens < self.start + 256)] - self.start
        return mulaw_decode(codes)

    def save_wav(self, tokens: np.ndarray, path: Path) -> None:
        write_wav(path, self.decode(tokens), self.config.sample_rate)

