"""Key redundancy (R-KV style), all-pairs or "lightning" (within each page).

For token ``i`` and the tokens ``C(i)`` it is compared with (the other valid
tokens of its page, or of the whole context), with ``sim`` the cosine
similarity of L2-normalised keys:

    j*(i) = the most recent j in C(i) with sim(i, j) > threshold (if any)
    r(i)  = sum over j in C(i), j != j*(i) of sim(i, j)
    redundancy = softmax over the context of r / (tau * n)

with ``n`` the comparison width (page size, or the context length). The most
recent near-duplicate is not counted, so of a run of repeated keys the latest
copies look least redundant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def redundancy_scores_reference(
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    block: int | None,
    threshold: float = 0.5,
    tau: float = 0.4,
) -> torch.Tensor:
    """Args:
        keys: ``[B, H, S, D]``.
        key_mask: ``[B, S]`` bool, False for padding (never compared, zero redundancy mass).
        block: compare only within consecutive blocks of this many tokens (the
            page size, for the lightning variant); None compares all pairs.
    Returns:
        ``[B, H, S]`` float32, a distribution over the valid tokens of each (row, head).
    """
    B, H, S, D = keys.shape
    n_norm = block if block is not None else S
    blk = block if block is not None else S
    nb = -(-S // blk)
    pad = nb * blk - S
    kn = F.normalize(keys.float(), dim=-1)
    mask = key_mask
    if pad:
        kn = F.pad(kn, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    kn = kn.view(B, H, nb, blk, D)
    m = mask.view(B, 1, nb, blk)
    sim = kn @ kn.transpose(-1, -2)  # [B, H, nb, blk, blk]
    pair = m[..., :, None] & m[..., None, :] & ~torch.eye(blk, dtype=torch.bool, device=keys.device)
    sim = sim.masked_fill(~pair, 0.0)
    near = (sim > threshold) & pair
    col = torch.arange(blk, device=keys.device)
    last = torch.where(near, col, torch.full_like(col, -1)).amax(dim=-1, keepdim=True)  # [.., blk, 1]
    drop = (col == last) & (last >= 0)
    r = sim.masked_fill(drop, 0.0).sum(dim=-1).view(B, H, nb * blk)[..., :S]
    logits = (r / (tau * n_norm)).masked_fill(~key_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def redundancy_scores(keys, key_mask, block, threshold=0.5, tau=0.4):
    return redundancy_scores_reference(keys, key_mask, block, threshold, tau)
