"""Mixture-of-experts feed-forward for Swin-MoE, on ``torch.distributed`` (no Tutel needed).

The semantics are those of Tutel's ``moe_layer`` as the official ``models/swin_transformer_moe.py`` configures
it (``fp32_gate``, ``is_postscore``, one gate, ``parallel_type 'adaptive:1'``, ``a2a_ffn_overlap_degree 1``):

- routing: a linear (or cosine) gate in fp32, Gaussian gate noise ``gate_noise / E`` on the logits in training,
  softmax, top-k experts per token; each token takes the next free slot of its expert's buffer of ``capacity``
  slots (in token order, or by descending top score with batch-prioritised routing); tokens past the capacity
  are dropped (their MoE output is zero); for k > 1 the k-th choices queue after all earlier choices;
- ``capacity = k * int(capacity_factor * ceil(tokens / E))`` (``capacity_factor <= 0``: the largest expert
  load over all ranks, capped at ``-capacity_factor`` times that when negative), rounded up to a multiple of the
  number of ranks sharing an expert;
- dispatch: the ``(E, capacity, C)`` buffer goes to the experts' ranks with ``all_to_all_single``, each rank
  runs its local experts (fc1, GELU, dropout ``moe_drop``, fc2) on the slots of every rank, and a second
  ``all_to_all_single`` brings the results back; combine: each token sums its experts' outputs weighted by its
  gate scores (normalised over its k choices with ``normalize_gate``, for k > 1);
- auxiliary loss: GShard's balance loss, or the mean of the importance and load losses of
  arXiv:1701.06538 (``is_gshard_loss False``);
- ``num_local_experts < 0``: ``-num_local_experts`` consecutive ranks share one expert, each holding a slice of
  its hidden units (and of fc2's bias); the slices are all-gathered for the forward (their gradients summed
  back), and each rank of the group computes its share of the expert's slots.

Why by hand: Tutel is not on PyPI and needs a compiled extension; nothing in torch or timm is a mixture of
experts layer. Parameter names and layouts are Tutel's, so official checkpoints load as they are:
``_moe_layer.experts.batched_fc1_w (L, H, C)``, ``batched_fc2_w (L, H, C)`` (fc2 stored transposed),
``batched_fc1_bias (L, H)``, ``batched_fc2_bias (L, ceil(C / s))``, ``_moe_layer.gates.0.wg.weight`` or
``gates.0.{temperature, cosine_projector.*, sim_matrix}``, and the buffer ``_moe_layer._num_global_experts``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


def world_info(group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """``(rank, world size)`` of ``group``; ``(0, 1)`` without a process group (one process needs none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def expert_layout(num_local_experts: int, world_size: int) -> Tuple[int, int, int]:
    """``(global experts, experts held by this rank, ranks sharing one expert)`` for ``NUM_LOCAL_EXPERTS``."""
    if num_local_experts == 0:
        raise ValueError("MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS must not be 0 (> 0: experts per rank; "
                         "< 0: that many ranks share one expert)")
    if num_local_experts > 0:
        return num_local_experts * world_size, num_local_experts, 1
    share = -num_local_experts
    if world_size % share:
        raise ValueError(f"MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS {num_local_experts}: {share} ranks share an expert, "
                         f"which does not divide the world size {world_size}")
    return world_size // share, 1, share


class TopKGate(nn.Module):
    """Linear router (``wg``, no bias) computed in fp32."""

    def __init__(self, model_dim: int, num_experts: int, k: int):
        super().__init__()
        self.top_k = min(num_experts, int(k))
        self.wg = nn.Linear(model_dim, num_experts, bias=False, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.wg.weight.float())  # (N, E)


class CosineTopKGate(nn.Module):
    """Cosine router: a projection to ``proj_dim``, cosine similarity with one learned vector per expert,
    times a learned temperature ``exp(min(temperature, log 100))`` (initially ``1 / init_t``)."""

    def __init__(self, model_dim: int, num_experts: int, k: int, proj_dim: int = 256, init_t: float = 0.5):
        super().__init__()
        self.top_k = min(num_experts, int(k))
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(model_dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dim, num_experts))
        nn.init.normal_(self.sim_matrix, 0, 0.01)
        self.clamp_max = math.log(1. / 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = F.linear(x.float(), self.cosine_projector.weight.float(), self.cosine_projector.bias.float())
        logits = F.normalize(projected, dim=1) @ F.normalize(self.sim_matrix.float(), dim=0)  # (N, E)
        return logits * torch.clamp(self.temperature, max=self.clamp_max).exp()


class Experts(nn.Module):
    """This rank's experts, batched: ``(L, T, C) -> (L, T, C)`` with fc1, GELU, dropout, fc2."""

    def __init__(self, model_dim: int, hidden: int, local_experts: int, share: int, moe_drop: float,
                 fc2_bias: bool):
        super().__init__()
        if hidden % share:
            raise ValueError(f"the MoE hidden size {hidden} cannot be split evenly over the {share} ranks that "
                             f"share an expert (MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS -{share})")
        self.share = share
        self.model_dim = model_dim
        part = hidden // share
        self.batched_fc1_w = nn.Parameter(torch.empty(local_experts, part, model_dim))
        self.batched_fc2_w = nn.Parameter(torch.empty(local_experts, part, model_dim))
        self.batched_fc1_bias = nn.Parameter(torch.zeros(local_experts, part))
        # official: without MLP_FC2_BIAS the bias stays (zero, frozen) and is still added
        self.batched_fc2_bias = nn.Parameter(torch.zeros(local_experts, (model_dim + share - 1) // share),
                                             requires_grad=fc2_bias)
        self.drop = nn.Dropout(moe_drop)

    def weights(self, group: Optional[dist.ProcessGroup]) -> List[torch.Tensor]:
        """fc1 weight, fc1 bias, fc2 weight, fc2 bias of the whole expert(s): all-gathered from the ranks that
        share an expert (their gradients are summed back by the gather's backward)."""
        w1, b1, w2, b2 = self.batched_fc1_w, self.batched_fc1_bias, self.batched_fc2_w, self.batched_fc2_bias
        if self.share == 1:
            return [w1, b1, w2, b2]
        w1, b1, w2, b2 = (torch.cat(dist_fn.all_gather(t, group=group), dim=1) for t in (w1, b1, w2, b2))
        return [w1, b1, w2, b2[:, :self.model_dim]]

    def forward(self, x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        # in the dtype of the dispatched tokens: the autocast dtype under autocast, as autocast would run the bmm
        w1, b1, w2, b2 = (t.to(x.dtype) for t in self.weights(group))
        h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))  # (L, T, H)
        h = self.drop(F.gelu(h))
        return torch.baddbmm(b2.unsqueeze(1), h, w2)  # (L, T, C)


class MoELayer(nn.Module):
    """Gate + dispatch + experts + combine (the module Tutel calls ``moe_layer``; official names inside)."""

    def __init__(self, model_dim: int, hidden: int, num_local_experts: int, top_k: int, capacity_factor: float,
                 gate_noise: float, cosine_router: bool, cosine_router_dim: int, cosine_router_init_t: float,
                 normalize_gate: bool, use_bpr: bool, is_gshard_loss: bool, moe_drop: float, fc2_bias: bool):
        super().__init__()
        self.rank, self.world_size = world_info()
        num_experts, local, share = expert_layout(num_local_experts, self.world_size)
        self.num_experts, self.local_experts, self.share = num_experts, local, share
        self.register_buffer('_num_global_experts', torch.tensor(num_experts))
        self.capacity_factor = capacity_factor
        self.gate_noise = gate_noise
        self.normalize_gate = normalize_gate
        self.use_bpr = use_bpr
        self.is_gshard_loss = is_gshard_loss
        self.experts = Experts(model_dim, hidden, local, share, moe_drop, fc2_bias)
        gate = (CosineTopKGate(model_dim, num_experts, top_k, cosine_router_dim, cosine_router_init_t)
                if cosine_router else TopKGate(model_dim, num_experts, top_k))
        self.gates = nn.ModuleList([gate])
        self._share_group: Optional[dist.ProcessGroup] = None  # made at the first forward (share_group)

    def share_group(self) -> dist.ProcessGroup:
        """The ranks sharing this rank's expert: ranks ``[e*share, (e+1)*share)`` hold expert ``e``. Made at the
        first forward, not at construction, so that a model builds without a process group (on the meta
        device, say); every rank joins every ``new_group`` call, in the same order."""
        if self._share_group is None:
            for e in range(self.num_experts):
                group = dist.new_group(list(range(e * self.share, (e + 1) * self.share)))
                if self.rank // self.share == e:
                    self._share_group = group
        return self._share_group

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + '_num_global_experts'
        if key in state_dict and int(state_dict[key]) != self.num_experts:
            raise ValueError(f"{prefix}: the checkpoint has {int(state_dict[key])} experts in all, this model "
                             f"{self.num_experts} (MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS x world size)")
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def capacity(self, tokens: int, top_k: int, loads: torch.Tensor) -> int:
        """Slots per expert (see the module doc); equal on every rank, as the all-to-all needs."""
        if self.world_size > 1:  # ranks with fewer tokens (a last batch) must still agree on the buffer size
            count = torch.tensor([tokens], device=loads.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            tokens = int(count)
        per_expert = (tokens + self.num_experts - 1) // self.num_experts
        if self.capacity_factor > 0:
            capacity = top_k * int(self.capacity_factor * per_expert)
        else:
            most = loads.max().reshape(1)
            if self.world_size > 1:
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
            capacity = int(most)
            if self.capacity_factor < 0:
                capacity = min(capacity, top_k * int(-self.capacity_factor * per_expert))
        return capacity + (-capacity % self.share)

    def route(self, x: torch.Tensor):
        """``(N, C)`` fp32 tokens -> expert ids ``(k, N)``, slots ``(k, N)``, gate weights ``(k, N)``, capacity,
        auxiliary loss."""
        gate = self.gates[0]
        logits = gate(x)  # (N, E) fp32
        noisy = logits
        if self.training and self.gate_noise > 0:
            noisy = logits + self.gate_noise * torch.randn_like(logits) / self.num_experts
        scores = F.softmax(noisy, dim=1)  # (N, E)
        top_k = gate.top_k
        top_ids = torch.topk(scores, top_k, dim=1).indices  # (N, k)
        if self.is_gshard_loss:
            l_aux = gshard_loss(scores, top_ids)
        else:
            l_aux = load_importance_loss(F.softmax(logits, dim=1), noisy.gather(1, top_ids), self.num_experts,
                                         self.gate_noise)
        masks = F.one_hot(top_ids.t(), self.num_experts).to(scores.dtype)  # (k, N, E)
        gates = (scores.unsqueeze(0) * masks).sum(dim=2)  # (k, N)
        if self.use_bpr:  # batch-prioritised routing: slots go to the tokens with the highest top score first
            order = (-scores.max(dim=1).values).argsort(dim=0)
            inverse = order.argsort(dim=0)
        slots, base = [], torch.zeros_like(masks[0, :1])  # base (1, E): slots taken by earlier choices
        for k in range(top_k):
            mask = masks[k]
            if self.use_bpr:
                loc = ((torch.cumsum(mask[order], dim=0) - 1) * mask[order])[inverse]
            else:
                loc = torch.cumsum(mask, dim=0) - 1
            loc = loc + base
            slots.append((loc * mask).sum(dim=1))
            base = base + mask.sum(dim=0, keepdim=True)
        if top_k > 1 and self.normalize_gate:
            gates = gates / torch.clamp(gates.sum(dim=0), min=torch.finfo(gates.dtype).eps)
        slots_t = torch.stack(slots).long()  # (k, N)
        capacity = self.capacity(x.shape[0], top_k, (loc[-1] + 1) if top_k > 0 else base)
        return top_ids.t(), slots_t, gates, capacity, l_aux

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(..., C)`` -> same shape, and the auxiliary loss (a scalar) of this call."""
        shape, dtype = x.shape, x.dtype
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
            else self.experts.batched_fc1_w.dtype
        tokens = x.reshape(-1, shape[-1])  # (N, C)
        with torch.autocast(x.device.type, enabled=False):
            ids, slots, gates, capacity, l_aux = self.route(tokens.to(compute))
            kept = slots < capacity  # (k, N): tokens past an expert's capacity are dropped
            # rows of the (E*capacity, C) buffer, and one spare row past its end for the dropped tokens: no
            # boolean indexing, whose data-dependent size would make the host wait for the device
            spare = self.num_experts * capacity
            flat = torch.where(kept, ids * capacity + slots, spare).reshape(-1)  # (k*N,)
            source = tokens.float().unsqueeze(0).expand(ids.shape[0], -1, -1).reshape(-1, shape[-1])  # (k*N, C)
            buffer = source.new_zeros(spare + 1, shape[-1]).index_copy(0, flat, source)[:spare]  # (E*cap, C)
            y = self.expert_pass(buffer.to(compute).view(self.num_experts, capacity, shape[-1])).float()
            y = torch.cat([y.reshape(-1, shape[-1]), y.new_zeros(1, shape[-1])])  # the spare row reads as zero
            picked = y.index_select(0, flat).view(*ids.shape, -1)  # (k, N, C)
            weights = (gates * kept).unsqueeze(-1)  # (k, N, 1)
            out = picked[0] * weights[0]
            for k in range(1, picked.shape[0]):
                out = out + picked[k] * weights[k]
        return out.to(dtype).view(shape), l_aux

    def expert_pass(self, y: torch.Tensor) -> torch.Tensor:
        """``(E, capacity, C)`` slots of this rank's tokens -> the experts' outputs for them, same shape."""
        E, cap, C = y.shape
        world = self.world_size
        if world == 1:
            return self.experts(y)
        if self.share > 1:  # every rank of an expert's group computes 1/share of its slots
            sent = y.reshape(world, E * cap // world, C)
            got = dist_fn.all_to_all_single(torch.empty_like(sent), sent.contiguous())  # (world, T, C)
            out = self.experts(got.reshape(1, -1, C), self.share_group())  # (1, world*T, C)
            back = dist_fn.all_to_all_single(torch.empty_like(sent), out.reshape(world, -1, C).contiguous())
            return back.view(E, cap, C)
        local = self.local_experts
        got = dist_fn.all_to_all_single(torch.empty_like(y), y.contiguous())  # (world*L, cap, C) by source rank
        got = got.view(world, local, cap, C).transpose(0, 1).reshape(local, world * cap, C)
        out = self.experts(got)  # (L, world*cap, C)
        out = out.view(local, world, cap, C).transpose(0, 1).contiguous().view(E, cap, C)
        return dist_fn.all_to_all_single(torch.empty_like(out), out)


def gshard_loss(scores: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """GShard's balance loss: ``E * sum_e mean score_e * fraction of tokens whose first choice is e``."""
    samples, experts = scores.shape
    ce = F.one_hot(top_ids[:, 0], experts).to(scores.dtype).sum(dim=0) * (experts / samples)
    return torch.sum(scores.sum(dim=0) * ce) / samples


def load_importance_loss(scores: torch.Tensor, topk_logits: torch.Tensor, num_experts: int,
                         gate_noise: float) -> torch.Tensor:
    """arXiv:1701.06538: mean of the importance loss (squared coefficient of variation of the summed scores)
    and the load loss (the same of each expert's smooth load under the gate noise); as Tutel computes it."""
    if gate_noise <= 0:
        raise ValueError("MODEL.SWIN_MOE.GATE_NOISE must be > 0 with IS_GSHARD_LOSS False (the load loss "
                         "normalises by it)")
    importance = scores.float().sum(dim=0)
    l_imp = importance.var() / (importance.mean() ** 2 + 1e-10)
    # the CDF of N(0, gate_noise / E) as torch.distributions.Normal computes it, without its argument check
    # (a host read of the device scale)
    inv_scale = torch.full((1,), gate_noise / num_experts, device=scores.device).reciprocal()
    threshold = topk_logits[:, -1].view(-1, 1).float()
    load = (0.5 * (1 + torch.erf((scores.float() - threshold) * inv_scale / math.sqrt(2)))).sum(dim=0)
    l_load = load.var() / (load.mean() ** 2 + 1e-10)
    return (l_imp + l_load) / 2.0


class MoEMlp(nn.Module):
    """The feed-forward of a Swin-MoE block (official name and arguments); ``forward(x, norm)`` applies ``norm``
    first, as :class:`models.mlp.Mlp` does, and keeps this call's auxiliary loss in ``l_aux``."""

    def __init__(self, in_features: int, hidden_features: int, num_local_experts: int = 1, top_value: int = 1,
                 capacity_factor: float = 1.25, cosine_router: bool = False, normalize_gate: bool = False,
                 use_bpr: bool = True, is_gshard_loss: bool = True, gate_noise: float = 1.0,
                 cosine_router_dim: int = 256, cosine_router_init_t: float = 0.5, moe_drop: float = 0.0,
                 init_std: float = 0.02, mlp_fc2_bias: bool = True):
        super().__init__()
        self.in_features, self.hidden_features = in_features, hidden_features
        self.top_value, self.capacity_factor = top_value, capacity_factor
        self._moe_layer = MoELayer(in_features, hidden_features, num_local_experts, top_value, capacity_factor,
                                   gate_noise, cosine_router, cosine_router_dim, cosine_router_init_t,
                                   normalize_gate, use_bpr, is_gshard_loss, moe_drop, mlp_fc2_bias)
        self.init_std = init_std
        self.l_aux: Optional[torch.Tensor] = None
        # the official FLOP count for this block's feed-forward: capacity_factor * k times a dense MLP's
        self.flops_scale = capacity_factor * top_value

    def init_weights(self) -> None:
        experts = self._moe_layer.experts
        trunc_normal_(experts.batched_fc1_w, std=self.init_std)
        trunc_normal_(experts.batched_fc2_w, std=self.init_std)
        nn.init.zeros_(experts.batched_fc1_bias)
        nn.init.zeros_(experts.batched_fc2_bias)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        out, self.l_aux = self._moe_layer(x)
        return out

    def expert_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """``(name relative to this module, parameter)`` of this rank's experts: not all-reduced by DDP."""
        return [('_moe_layer.experts.' + n, p) for n, p in self._moe_layer.experts.named_parameters()]

    def extra_repr(self) -> str:
        layer = self._moe_layer
        return (f'in_features={self.in_features}, hidden_features={self.hidden_features}, '
                f'experts={layer.num_experts} ({layer.local_experts} here, shared by {layer.share}), '
                f'top_value={self.top_value}, capacity_factor={self.capacity_factor}')
