"""Multi-scale kNN evaluation of frozen encoders (the Scale-MAE protocol).

Validation images are down-sampled by area interpolation to ratio x input size, then resized back
(``resize``) or fed at the reduced size with interpolated position embeddings (``native``); the memory
(training) set stays at full resolution. Two classifiers share the same cosine neighbours:

- weighted kNN (InstDisc, Scale-MAE): k = 20 neighbours vote with weight exp(similarity / T), T = 0.07;
- majority kNN (torchgeo-bench): k = 5 neighbours, one vote each; ties go to the lowest class index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from util.errors import NonFiniteError
from util.eval.inference import infer
from util.run.distributed import gather_rows, main_print, rank, world_size

WEIGHTED_K, MAJORITY_K = 20, 5  # the module docstring's protocols
CLASSIFIER_POOL = "classifier"  # a trained classifier's own pooling, the features its head sees (pre-logits)


def reduced_size(input_size: int, ratio: float, patch_size: int, scale_mode: str) -> int:
    """Side of the down-sampled image; in native mode a multiple of the patch size (at least one patch)."""
    size = max(1, round(input_size * ratio))
    if scale_mode == "native":
        size = max(patch_size, size // patch_size * patch_size)
    return size


def rescale(images: torch.Tensor, ratio: float, patch_size: int, scale_mode: str) -> torch.Tensor:
    """images [B, C, S, S] -> area down-sampled to ratio x S; ``resize`` brings it back to S (bicubic)."""
    if ratio == 1.0:
        return images
    side = images.shape[-1]
    small = F.interpolate(images, size=reduced_size(side, ratio, patch_size, scale_mode), mode="area")
    if scale_mode == "native":
        return small
    return F.interpolate(small, size=side, mode="bicubic", align_corners=False)


def encoder_features(encoder: VisionTransformer, images: torch.Tensor, pool: str, final_norm: bool) -> torch.Tensor:
    """L2-normalised [B, D] features: the cls token or the mean of the patch tokens of the last block
    (after the encoder's final LayerNorm when ``final_norm``); ``pool="classifier"``: what a trained classifier's
    head sees (its pooling and norm, timm ``forward_head(pre_logits=True)``)."""
    if pool == CLASSIFIER_POOL:
        return F.normalize(encoder.forward_head(encoder.forward_features(images), pre_logits=True).float(), dim=1)
    x = encoder.blocks(encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(images))))  # [B, 1+L, D]
    if final_norm:
        x = encoder.norm(x)
    pooled = x[:, 0] if pool == "cls" else x[:, encoder.num_prefix_tokens :].mean(dim=1)
    return F.normalize(pooled.float(), dim=1)


def extract(
    encoder: VisionTransformer,
    loader,
    device: torch.device,
    pool: str,
    final_norm: bool,
    scales: Sequence[float] = (1.0,),
    scale_mode: str = "resize",
    desc: str = "kNN features",
) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """Features of every sample at every scale (each image is decoded once), and the labels; on the CPU,
    gathered over ranks in dataset order."""
    encoder.eval()
    patch_size = encoder.patch_embed.patch_size[0]
    features, labels = infer(
        lambda images: {
            s: encoder_features(encoder, rescale(images, s, patch_size, scale_mode), pool, final_norm) for s in scales
        },
        loader,
        device,
        desc,
    )
    for scale, values in features.items():
        if not torch.isfinite(values).all():
            bad = (~torch.isfinite(values)).any(1).nonzero()[:, 0]
            raise NonFiniteError(
                f"kNN: the encoder's features are NaN/inf for {len(bad)} of {len(values)} images at scale {scale:g} "
                f"(first: image {bad[0].item()}); refusing to report an accuracy"
            )
    return features, labels


def topk_cosine(
    queries: torch.Tensor, memory: torch.Tensor, k: int, query_chunk: int = 4096, memory_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar memory rows of each query (rows L2-normalised), by blocks: each block's own top k first,
    then merged with the best k so far, so memory use is bounded by query_chunk x memory_chunk similarities (and
    query_chunk x 2k candidates) whatever the set sizes; no index table of the block's size is built.

    Returns:
        (similarities [Q, k], memory indices [Q, k]), most similar first.
    """
    k = min(k, len(memory))
    best_sims, best_idx = [], []
    for q in range(0, len(queries), query_chunk):
        query = queries[q : q + query_chunk]
        sims = torch.full((len(query), 0), -math.inf, device=query.device)
        idx = torch.zeros((len(query), 0), dtype=torch.long, device=query.device)
        for m in range(0, len(memory), memory_chunk):
            block = query @ memory[m : m + memory_chunk].T  # [q, m]
            block_sims, block_idx = block.topk(min(k, block.shape[1]), dim=1)  # [q, <= k]
            sims = torch.cat([sims, block_sims], dim=1)
            idx = torch.cat([idx, block_idx + m], dim=1)
            sims, order = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx.gather(1, order)
        best_sims.append(sims)
        best_idx.append(idx)
    return torch.cat(best_sims), torch.cat(best_idx)


def weighted_knn(
    sims: torch.Tensor,
    neighbours: torch.Tensor,
    memory_labels: torch.Tensor,
    num_classes: int,
    temperature: float = 0.07,
) -> torch.Tensor:
    """InstDisc vote: each neighbour adds exp(similarity / T) to its class. Returns predictions [Q].

    The votes of a query are computed as exp((similarity - its highest similarity) / T): the same ratios, hence the
    same argmax, without overflow to inf for any T > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    votes = torch.zeros(len(sims), num_classes, dtype=torch.float64)
    sims = sims.double()
    top = sims.max(dim=1, keepdim=True).values if sims.numel() else sims
    votes.scatter_add_(1, memory_labels[neighbours], ((sims - top) / temperature).exp())
    return votes.argmax(dim=1)


def majority_knn(neighbours: torch.Tensor, memory_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One vote per neighbour; ties go to the lowest class index. Returns predictions [Q]."""
    votes = torch.zeros(len(neighbours), num_classes, dtype=torch.long)
    votes.scatter_add_(1, memory_labels[neighbours], torch.ones_like(neighbours))
    return votes.argmax(dim=1)


def neighbours_used(k: int, majority_k: int, memory_size: int) -> tuple[int, int]:
    """(k, majority k) the classifiers can use on a memory set of ``memory_size`` images: each at most that many
    (the search returns no more); a note is printed (rank 0) for each one clipped, as ``protocol.json`` records it.
    """
    used = min(k, memory_size), min(majority_k, memory_size)
    for flag, asked, got in (("--k", k, used[0]), ("--majority_k", majority_k, used[1])):
        if got != asked:
            main_print(f"note: {flag} {asked}: the memory set has {memory_size} images, so k = {got} is used")
    return used


def knn_accuracies(
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = WEIGHTED_K,
    temperature: float = 0.07,
    majority_k: int = MAJORITY_K,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1 (%) of the weighted and the majority classifier.

    The neighbour search runs on ``device``; under DDP each rank searches for every world_size-th query and the
    neighbours are gathered, so every rank returns the same accuracies.
    """
    shard = queries[rank() :: world_size()].to(device)
    sims, neighbours = topk_cosine(shard, memory.to(device), max(k, majority_k))
    sims, neighbours = gather_rows(sims, device), gather_rows(neighbours, device)  # [Q, k] on the CPU
    weighted = weighted_knn(sims[:, :k], neighbours[:, :k], memory_labels, num_classes, temperature)
    majority = majority_knn(neighbours[:, :majority_k], memory_labels, num_classes)
    return {
        "weighted": 100.0 * (weighted == query_labels).double().mean().item(),
        "majority": 100.0 * (majority == query_labels).double().mean().item(),
    }


def multiscale_accuracies(
    encoder: VisionTransformer,
    final_norm: bool,
    memory_loader,
    query_loader,
    num_classes: int,
    device: torch.device,
    scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
    pool: str = "cls",
    scale_mode: str = "resize",
    k: int = WEIGHTED_K,
    temperature: float = 0.07,
    majority_k: int = MAJORITY_K,
) -> dict[tuple[str, float], float]:
    """Top-1 (%) of both classifiers at every scale, the memory set at full resolution: {(classifier, scale):
    accuracy}."""
    memory, memory_labels = extract(encoder, memory_loader, device, pool, final_norm, desc="kNN memory features")
    queries, query_labels = extract(
        encoder, query_loader, device, pool, final_norm, scales, scale_mode, desc="kNN evaluation features"
    )
    results = {}
    for scale in scales:
        accuracies = knn_accuracies(
            memory[1.0], memory_labels, queries[scale], query_labels, num_classes, k, temperature, majority_k, device
        )
        for classifier, accuracy in accuracies.items():
            results[classifier, scale] = accuracy
    return results
