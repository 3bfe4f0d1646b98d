"""Calibration across processes: each rank observes its shard, the statistics are merged exactly.

    torchq.prepare(model, config)
    for batch in my_shard_of_the_data:           # DistributedSampler, or any split
        model(batch)
    torchq.distributed.merge_statistics(model)   # every rank calls it (a collective)
    if torch.distributed.get_rank() == 0:
        torchq.export(model, example, "model.int8.onnx")

Why the merge is exact: the histograms use zero-aligned power-of-two bins whose width depends only
on the global min and max (onnx_backend/statistics.py). So every rank can re-bin its counts to the
bin width the union of all shards needs (`coarsen`, exact) and the counts simply add. After the
merge every rank holds, for every tensor, the min, max, count and histogram a single process
would have built from all the data, bit for bit; ranges chosen from them are identical.

Collectives per call, whatever the number of tensors: one all_gather_object (the union of the
observed keys and their channel layouts), three all_reduce (MIN, MAX and SUM of the scalars:
counts, mask values left out, batches), one SUM all_reduce of all histograms packed into a single
int64 tensor (at most `histogram_bins` int64 per tensor) and two of the per-channel sums (float64)
and counts (int64) packed likewise. The channel sums add exactly up to float64 rounding.
"""

from __future__ import annotations

import atexit
import functools
import math
import weakref

import numpy as np
import torch
import torch.distributed as dist

from onnx_backend.errors import CalibrationError
from onnx_backend.statistics import MIN_EXPONENT, ChannelSums, TensorStatistics, coarsen, realign, required_exponent

from .observer import Observer
from .prepare import session_of


# sessions whose statistics are already merged -> their batch count then
_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _device(group) -> torch.device:
    """Where collective buffers live: NCCL needs the current GPU, gloo and others the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_statistics(model: torch.nn.Module, group=None) -> int:
    """Merge the prepared `model`'s statistics across the ranks of `group` (all ranks must call it).

    Afterwards each rank's observers hold the statistics of all ranks' data together. Returns the
    number of calibration batches seen by all ranks. Calling it again is a no-op (unless batches
    ran in between, which is an error: merge once, after the last batch). Without an initialized process group (or
    with one rank) it does nothing and returns this process's batch count.
    """
    session, _ = session_of(model)
    if not is_distributed(group):
        return session.batches
    if session in _MERGED:
        # The observers already hold every rank's data; merging again would count it twice.
        if _MERGED[session] == session.batches:
            return session.batches
        raise CalibrationError("calibration batches ran after merge_statistics; merge once, after the last calibration batch")
    device = _device(group)
    # 1. the union of the observed keys (a rank may not have seen a key: data-dependent branches)
    local = {key: obs.ndim for key, obs in session.observers.items() if obs.observed}
    layouts = {key: _channel_layout(session.observers[key].channels) for key in local}
    gathered: list[tuple] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, (local, session.max_bins, layouts), group=group)
    bins = {b for _, b, _ in gathered}
    if len(bins) != 1:
        raise CalibrationError(f"ranks were prepared with different histogram_bins ({sorted(bins)}); use one QuantConfig on every rank")
    ndims: dict[str, int | None] = {}
    for keys, _, _ in gathered:
        for k, nd in keys.items():
            ndims.setdefault(k, nd)
    keys = sorted(ndims)
    if not keys:
        raise CalibrationError("no rank observed any tensor: run calibration batches on the prepared model first")
    stats = [session.observers[k].to_statistics() if k in local else TensorStatistics(session.max_bins) for k in keys]

    # 2. global min, max, count, and the finest exponent any rank used (the merged one is never finer)
    lo = torch.tensor([s.min for s in stats], dtype=torch.float64, device=device)  # empty: +inf
    hi = torch.tensor([s.max for s in stats], dtype=torch.float64, device=device)  # empty: -inf
    scalars = torch.tensor([[s.count for s in stats], [s.mask_low for s in stats], [s.mask_high for s in stats], [session.batches] + [0] * (len(stats) - 1)], dtype=torch.int64, device=device)
    exps = torch.tensor([s.exponent if not s.empty else -(2**40) for s in stats], dtype=torch.int64, device=device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(exps, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    lo, hi, exps, counts, mask_low, mask_high = lo.tolist(), hi.tolist(), exps.tolist(), scalars[0].tolist(), scalars[1].tolist(), scalars[2].tolist()
    batches = int(scalars[3, 0])

    # 3. every rank re-bins to the common geometry; one SUM of all histograms packed together
    layout = []
    for i, s in enumerate(stats):
        if counts[i] == 0:  # nothing but mask values on every rank: no histogram
            layout.append((MIN_EXPONENT, 0, 0))
            continue
        e = max(required_exponent(lo[i], hi[i], session.max_bins), exps[i])
        w = math.ldexp(1.0, -e)
        first, last = math.floor(lo[i] * w), math.floor(hi[i] * w)
        layout.append((e, first, last - first + 1))
    packed = np.zeros(sum(n for _, _, n in layout), dtype=np.int64)
    start = 0
    for s, (e, first, n) in zip(stats, layout):
        if not s.empty:
            c, off = coarsen(s.counts, s.offset, e - s.exponent)
            packed[start : start + n] = realign(c, off, first, n)
        start += n
    total = torch.from_numpy(packed).to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total.cpu().numpy()

    channels = _merged_channels(keys, stats, [g[2] for g in gathered], device, group)

    # 4. load the merged statistics into every rank's observers
    start = 0
    for i, (key, (e, first, n)) in enumerate(zip(keys, layout)):
        merged = TensorStatistics(session.max_bins, lo[i], hi[i], counts[i], e, first, total[start : start + n].copy(), mask_low[i], mask_high[i], channels[i])
        start += n
        obs = session.observers.get(key)
        if obs is None:
            obs = session.observers[key] = Observer(key, session.max_bins)
        target_device = obs.counts.device if obs.counts is not None else None
        obs.load_statistics(merged, device=target_device)
        obs.ndim = ndims[key]
    session.batches = batches
    _MERGED[session] = batches
    return batches


def require_merged(session) -> None:
    """Refuse to export one rank's shard of the statistics under a multi-rank process group: the
    model would be calibrated on that rank's data alone, silently."""
    if not is_distributed():
        return
    if session not in _MERGED:
        state = "holds only its own shard of the calibration statistics"
    elif _MERGED[session] != session.batches:
        state = "ran calibration batches after merge_statistics, which only it has seen"
    else:
        return
    raise CalibrationError(
        f"rank {rank()} of {dist.get_world_size()} {state}; call torchq.distributed.merge_statistics(model) on every rank "
        "after the last calibration batch and before torchq.export, or torchq.distributed.export_on_rank_zero(model, example_inputs, path) "
        "on every rank (it merges, then exports on rank 0)"
    )


@functools.cache  # registers the handler once per process
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit, while Python is still whole.

    A gloo group left to interpreter finalization can abort its process ("terminate called without
    an active exception", pytorch/pytorch#190489): its worker threads may still hold tensors whose
    release needs the GIL. Lightning registers this cleanup for NCCL only; under `ddp_spawn` on CPU
    a rank died with SIGABRT after fit. A group already destroyed is left alone.
    """
    atexit.register(_destroy_if_initialized)


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def _channel_layout(channels: ChannelSums) -> tuple[int, dict[int, int]]:
    """(rank, {axis: channels}) of one observer's per-channel sums."""
    return channels.ndim, {a: int(v.size) for a, v in channels.sums.items()}


def _common_layout(layouts: list[tuple[int, dict[int, int]]]) -> tuple[int, dict[int, int]]:
    """The layout every rank's sums fit: the axes all ranks that saw the tensor kept, with the
    same sizes (what ChannelSums.merged keeps)."""
    seen = [lay for lay in layouts if lay[0] != 0]
    if not seen:
        return 0, {}
    if len({nd for nd, _ in seen}) != 1 or seen[0][0] == -1:
        return -1, {}
    axes = {a: n for a, n in seen[0][1].items() if all(lay[1].get(a) == n for lay in seen)}
    return seen[0][0], axes


def _merged_channels(keys: list[str], stats: list[TensorStatistics], gathered: list[dict], device, group) -> list[ChannelSums]:
    """Every tensor's per-channel sums over all ranks: two SUM all_reduce of everything packed."""
    common = [_common_layout([g.get(k, (0, {})) for g in gathered]) for k in keys]
    size = sum(n for _, axes in common for n in axes.values())
    sums, counts = np.zeros(size, dtype=np.float64), np.zeros(size, dtype=np.int64)
    start = 0
    for s, (_, axes) in zip(stats, common):
        for a, n in sorted(axes.items()):
            if a in s.channels.sums:  # a rank that never saw the tensor adds zeros
                sums[start : start + n], counts[start : start + n] = s.channels.sums[a], s.channels.counts[a]
            start += n
    total_sums, total_counts = torch.from_numpy(sums).to(device), torch.from_numpy(counts).to(device)
    dist.all_reduce(total_sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(total_counts, op=dist.ReduceOp.SUM, group=group)
    total_sums, total_counts = total_sums.cpu().numpy(), total_counts.cpu().numpy()
    out, start = [], 0
    for ndim, axes in common:
        merged_sums, merged_counts = {}, {}
        for a, n in sorted(axes.items()):
            merged_sums[a], merged_counts[a] = total_sums[start : start + n].copy(), total_counts[start : start + n].copy()
            start += n
        out.append(ChannelSums(ndim, merged_sums, merged_counts))
    return out


def export_on_rank_zero(model: torch.nn.Module, example_inputs, path=None, *, group=None, **options):
    """merge_statistics, then torchq.export on rank 0 only; the other ranks wait for it.

    Returns the INT8 ModelProto on rank 0 and None elsewhere.
    """
    from .export import export

    merge_statistics(model, group)
    model_proto = None
    try:
        if rank(group) == 0:
            model_proto = export(model, example_inputs, path, **options)
    finally:
        barrier(group)
    return model_proto
