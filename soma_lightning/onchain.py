"""The on-chain loss of SOMA V1 (contract section 4.3), as the network's Rust `ModelRunner::eval` computes it:
contract chunks in batches of 16 in data order; for batch b, noise from soma-arrgen with seed + b; CE summed
over non-PAD targets divided by rows x S (PAD in the denominator); loss = CE + 0.02 SIGReg; loss and
embedding (reps averaged over positions, then rows) are running means over batches.
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from soma_lightning.data_modules.contract import PAD, tokenize
from soma_lightning.errors import UserError
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.sigreg import SIGRegConfig, sigreg_statistic

V1_SEQ_LEN, V1_BATCH_SIZE = 1024, 16  # the scorer's rows (bytes per row, MAX_SEQ_LEN) and rows per batch: ModelRunner::new
ONCHAIN_SIGREG = SIGRegConfig()  # 0.02, 256 slices, 17 points, t_max 3: fixed in ModelRunner::new


def arrgen_noise(seed: int, d_model: int, slices: int = 256) -> Tensor:
    """The runtime's SIGReg noise: soma-arrgen's normal(seed, [D, slices], 0, 1) in row-major order."""
    import arrgen

    return torch.from_numpy(np.asarray(arrgen.normal_array(seed, [d_model, slices], 0.0, 1.0), dtype=np.float32))


def target_nll(logits: Tensor, targets: Tensor, pad: int = PAD) -> Tensor:
    """Per-position NLL [B, T] in float32, zero where the target is `pad` (the V1 contract's PAD by default)."""
    return F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=pad, reduction="none")


def onchain_batch_loss(nll: Tensor, sigreg_raw: Tensor) -> Tensor:
    """One batch's on-chain loss: NLL summed over non-PAD targets / (rows x S), plus 0.02 x raw SIGReg."""
    return nll.sum() / nll.numel() + ONCHAIN_SIGREG.coefficient * sigreg_raw


@dataclass
class Score:
    loss: float
    ce: float
    sigreg: float
    n_tokens: int
    n_batches: int
    embedding_norm: float


def describe_scoring(n_bytes: int, batch_size: int = V1_BATCH_SIZE, seq_len: int = V1_SEQ_LEN) -> str:
    """One line on how `score` splits `n_bytes` of data: rows of seq_len bytes, batches of batch_size rows."""
    rows = -(-n_bytes // seq_len)
    batches = -(-rows // batch_size)
    return (
        f"scoring {n_bytes:,} bytes as {rows:,} row{'s' * (rows != 1)} of {seq_len} bytes (the scorer's row length) "
        f"in {batches:,} batch{'es' * (batches != 1)} of {batch_size}"
    )


@torch.no_grad()
def score(
    model: SomaModel, data: bytes, seed: int = 0, batch_size: int = V1_BATCH_SIZE, seq_len: int = V1_SEQ_LEN, autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[Score, Tensor]:
    """The canonical scorer's loss and embedding of `data` (running means over batches, as ModelRunner::eval).
    `ce` and `sigreg` (raw, before the 0.02) are running means of their per-batch values too. `progress`: a
    progress bar over the batches on stderr (tqdm), with the running loss; the arithmetic is the same."""
    rows = tokenize(data, seq_len)
    if len(rows["tokens"]) == 0:
        raise UserError("--data: no data to score (0 bytes); the canonical scorer fails with EmptyData")
    device = next(model.parameters()).device
    d_model = model.embedding.embedding_dim
    means = torch.zeros(3, dtype=torch.float32)
    embedding = torch.zeros(d_model, dtype=torch.float32)
    n_batches = 0
    starts = range(0, len(rows["tokens"]), batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc="score", unit="batch", file=sys.stderr, dynamic_ncols=True)
    for b, start in enumerate(starts):
        batch = {k: v[start : start + batch_size].to(device) for k, v in rows.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            reps = model.encode(batch["tokens"], batch["positions"])
            logits = model.predict(reps)
        nll = target_nll(logits, batch["targets"])
        sig = sigreg_statistic(reps, arrgen_noise(seed + b, d_model).to(device))
        values = torch.stack([onchain_batch_loss(nll, sig), nll.sum() / nll.numel(), sig]).float().cpu()
        n_batches += 1
        means += (values - means) / n_batches
        embedding += (reps.float().mean(dim=1).mean(dim=0).cpu() - embedding) / n_batches
        if bar is not None:
            bar.set_postfix(loss=f"{means[0].item():.5f}", refresh=False)
            bar.update()
    if bar is not None:
        bar.close()
    n_tokens = int((rows["targets"] != PAD).sum())
    loss, ce, sig = means.tolist()
    return Score(loss, ce, sig, n_tokens, n_batches, float(embedding.norm())), embedding
