"""Stage 1: streaming activation statistics per (site, group), from one forward pass per prompt; the statistics
object and its file are `neuroshield.neurons.activation_stats.ActivationStats` (re-exported here).

For every site (layer, kind) and group (language, modality, label) we keep float64 running sums
over the counted token positions (see `EncodedPrompt.position_mask`):

    count      number of counted tokens (the same for every site, kept once per group)
    sum        Σ a          sum_abs  Σ |a|          sum_sq  Σ a²          n_pos  #(a > 0)

and, for the attention sites `attn_q`, `attn_k`, `attn_v`, an `impact` sum used by the `plnd` score
(see `neuroshield.neurons.scores`), summed over counted query tokens t:

    attn_q     scaling · |q_j(t)| · Σ_s p_h(t,s) · |[R_tᵀ k_rot(s)]_j|                 (h = j's head)
    attn_k     Σ_{h reading kv head g} scaling · Σ_s p_h(t,s) · |k_j(s)| · |[R_sᵀ q_rot,h(t)]_j|
    attn_v     ‖ Σ_{u ∈ Q(j)} a_u(t) · W_o[:, u] ‖₂

i.e. the attention-weighted absolute change of the attention logits when unit j is zeroed: q and
k are the vectors that enter the dot product before the rotary embedding (after the per-head
q_norm / k_norm of Qwen3 and Gemma 3), k_rot/q_rot after it, R_t the rotation at position t (so
R_tᵀ k_rot(s) is the key seen in the query's frame), p_h the attention probabilities of query head h,
`scaling` the module's logit scale; Q(j) the `o_proj` input units value unit j feeds
(`AttentionGeometry.query_units_of_kv_unit`), a_u the `o_proj` inputs. `qk_impact="exact"` (default)
computes the rotated factor per (t, s) in chunks, O(T²·D) per head; `qk_impact="pair"` replaces it
by the rotation-free bound ρx_j = sqrt(x_j² + x_pair(j)²) (RoPE rotates dims d and d ± D/2 together),
which costs one matmul. Attention probabilities need the eager attention implementation, switched on
for the pass and restored after.

Within a batch each row's sums over its (at most T) counted tokens are formed in float32 (float64 for
a float64 model), then added into the float64 per-group sums with one [G, B] product per site.

Memory is O(sites × units × groups): nothing is kept per prompt or per token (prompts are encoded
again batch by batch; only their lengths are kept for sorting). The forward pass stops
after the last decoder layer that holds a site (no final norm, no logits), by an exception raised from
a hook on that layer and caught here; every hook is removed in `finally`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from neuroshield.data.records import PromptRecord, group_name
from neuroshield.models.chat import POSITIONS, batches_by_length
from neuroshield.models.hooks import site_hooks
from neuroshield.models.loading import LoadedModel, dtype_name
from neuroshield.models.sites import Site, resolve_sites
from neuroshield.models.vlm import encode_record, model_inputs
from neuroshield.neurons.activation_stats import (
    IMPACT_KINDS,
    QK_IMPACT_MODES,
    SUMS,
    ActivationStats,
    StatsMismatchError,
    data_hash,
    group_hashes,
)


class _StopForward(Exception):
    """Raised by the hook on the last needed decoder layer to skip the rest of the forward pass."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE partner of each dim, as transformers' `rotate_half`: (x1, x2) -> (−x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pair_norm(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x_d² + x_{d±D/2}²) over the last dim (the rotary pairs of `rotate_half`)."""
    half = x.shape[-1] // 2
    sq = x * x
    paired = torch.cat([sq[..., half:], sq[..., :half]], dim=-1) if x.shape[-1] % 2 == 0 else torch.zeros_like(sq)
    return (sq + paired).sqrt()


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a model to the eager attention implementation (which returns probabilities) and back."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class ActivationCollector:
    """The hooks that fill the running sums; usable on any forward pass (see `collect_statistics`).

    Before each forward pass call `set_batch(mask, group_ids)` with the [B, T] mask of counted tokens
    and the group index of each row. `attach(stop=True)` installs the hooks (and the early stop).
    """

    def __init__(self, loaded: LoadedModel, sites: Sequence[Site], n_groups: int, *, impact: bool,
                 qk_impact: str = "exact", chunk_elements: int = 1 << 24, device: torch.device | None = None) -> None:
        if qk_impact not in QK_IMPACT_MODES:
            raise ValueError(f"qk_impact={qk_impact!r}: choose one of {', '.join(QK_IMPACT_MODES)}")
        self.qk_impact = qk_impact
        self.chunk_elements = chunk_elements
        self.loaded = loaded
        self.sites = list(sites)
        self.n_groups = n_groups
        self.device = device or loaded.device
        if self.device.type == "mps":  # no float64 on MPS
            self.device = torch.device("cpu")
        self.impact = impact and any(s.kind in IMPACT_KINDS for s in self.sites)
        self.tensors: dict[str, torch.Tensor] = {"count": self._zeros()}
        # one [G, 4, W] block per site (sum, sum_abs, sum_sq, n_pos), updated by one matmul per hook call;
        # the per-sum tensors are views of it
        self._block: dict[str, torch.Tensor] = {}
        for s in self.sites:
            block = torch.zeros((n_groups, len(SUMS), s.width), dtype=torch.float64, device=self.device)
            self._block[s.key] = block
            for i, name in enumerate(SUMS):
                self.tensors[f"{s.key}/{name}"] = block[:, i, :]
            if self.impact and s.kind in IMPACT_KINDS:
                self.tensors[f"{s.key}/impact"] = self._zeros(s.width)
        self.geometry = loaded.adapter.geometry(loaded.model.config)
        self.layers = loaded.adapter.layers(loaded.model)
        self._mask: torch.Tensor | None = None
        self._row_onehot = torch.zeros((n_groups, 0), dtype=torch.float64, device=self.device)
        self._masks_on: dict[torch.device, torch.Tensor] = {}
        self._seen: set[str] = set()
        self._buf: dict[tuple[int, str], torch.Tensor] = {}
        by_layer: dict[int, set[str]] = {}
        for s in self.sites:
            by_layer.setdefault(s.layer, set()).add(s.kind)
        self.impact_layers = {l: k & set(IMPACT_KINDS) for l, k in by_layer.items() if k & set(IMPACT_KINDS)} \
            if self.impact else {}
        self._gram: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _zeros(self, width: int | None = None) -> torch.Tensor:
        shape = (self.n_groups,) if width is None else (self.n_groups, width)
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    @property
    def last_layer(self) -> int:
        return max(s.layer for s in self.sites)

    # --- per batch -------------------------------------------------------------------------------
    def set_batch(self, mask: torch.Tensor, group_ids: torch.Tensor) -> None:
        """`mask` [B, T] bool of counted tokens; `group_ids` [B] long group index of each row."""
        self._mask = mask.bool()
        # [G, B] one-hot of the rows' groups: per-row sums times it give per-group sums (one small GEMM)
        self._row_onehot = torch.nn.functional.one_hot(group_ids.to(self.device), self.n_groups).T.to(torch.float64)
        self.tensors["count"] += self._row_onehot @ self._mask.sum(1).to(device=self.device, dtype=torch.float64)
        self._seen = set()
        self._buf = {}
        self._masks_on = {}

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        assert self._mask is not None, "call set_batch() before the forward pass"
        if device not in self._masks_on:
            self._masks_on[device] = self._mask.to(device)[..., None]  # [B, T, 1]
        return self._masks_on[device]

    @staticmethod
    def _work_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _counted(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, W] in the working dtype with every uncounted position (padding included) set to 0, so not
        even a NaN at a padded position can leak into the sums."""
        x = x.detach()
        return x.to(self._work_dtype(x)).masked_fill(~self._mask_on(x.device), 0)

    def _row_sums(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, W] -> [B, W] sums over the counted tokens of each row."""
        return self._counted(x).sum(1)

    def _add_rows(self, key: str, per_row: torch.Tensor) -> None:
        """Add [B, W] per-row sums to the float64 per-group running sums of `key`."""
        self.tensors[key] += self._row_onehot @ per_row.to(device=self.device, dtype=torch.float64)

    def _on_site(self, site: Site, units: torch.Tensor) -> None:
        # per row: Σ a, Σ|a|, Σa², #(a>0) over counted tokens, in float32 (float64 for float64 models;
        # a row holds at most T tokens), then per group in float64; no [tokens, 4, W] copies
        x = self._counted(units)  # [B, T, W]
        feats = torch.stack([x.sum(1), x.abs().sum(1), (x * x).sum(1), (x > 0).sum(1, dtype=x.dtype)], dim=1)
        block = self._block[site.key]  # [G, 4, W], order of SUMS
        block += (self._row_onehot @ feats.reshape(feats.shape[0], -1).to(block)).view(block.shape)
        self._seen.add(site.key)
        return None

    # --- attention impacts ------------------------------------------------------------------------
    def _v_gram(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [W_kv, rep] of the o_proj inputs each value unit feeds, Gram [W_kv, rep, rep])."""
        if layer not in self._gram:
            attn = getattr(self.layers[layer], self.loaded.adapter.attn)
            o = getattr(attn, self.loaded.adapter.o_proj)
            g = self.geometry
            idx = torch.tensor([g.query_units_of_kv_unit(j) for j in range(g.num_kv_heads * g.head_dim)],
                               dtype=torch.long, device=o.weight.device)
            cols = o.weight.detach().to(torch.float64)[:, idx]  # [out, W_kv, rep]
            gram = torch.einsum("okr,oks->krs", cols, cols)
            self._gram[layer] = (idx, gram.to(self.device))
        return self._gram[layer]

    def _on_attention(self, layer: int, attn: nn.Module, output: Any) -> None:
        kinds = self.impact_layers[layer]
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        g = self.geometry
        if kinds & {"attn_q", "attn_k"}:
            if probs is None:
                raise RuntimeError(
                    f"layer {layer}: the attention module returned no probabilities; the q/k impact needs "
                    "the eager attention implementation"
                )
            q = self._buf.pop((layer, "q"))  # [B, T, H, D]
            k = self._buf.pop((layer, "k"))  # [B, T, G, D]
            pe = self._buf.pop((layer, "pe"), None)
            work = torch.float64 if q.dtype == torch.float64 else torch.float32
            p = probs.detach().to(work)  # [B, H, T, T]
            q = q.detach().to(work).transpose(1, 2)  # [B, H, T, D]
            k = k.detach().to(work).transpose(1, 2)  # [B, G, T, D]
            scaling = float(getattr(attn, "scaling", g.head_dim ** -0.5))
            if self.qk_impact == "exact" and pe is not None:
                iq, ik = self._qk_exact(q, k, p, pe, kinds, work)
            else:
                iq, ik = self._qk_pair(q, k, p, kinds)
            b, h, t, d = q.shape
            if iq is not None:
                self._add_rows(f"{layer}.attn_q/impact",
                               scaling * self._row_sums(iq.transpose(1, 2).reshape(b, t, h * d)))
            if ik is not None:
                ik = ik.view(b, g.num_kv_heads, g.group_size, t, d).sum(2)  # the heads that read kv head g
                self._add_rows(f"{layer}.attn_k/impact",
                               scaling * self._row_sums(ik.transpose(1, 2).reshape(b, t, g.num_kv_heads * d)))
        if "attn_v" in kinds:
            a = self._buf.pop((layer, "o_in")).detach()  # [B, T, H*D]
            idx, gram = self._v_gram(layer)
            sel = a.to(torch.float64)[..., idx.to(a.device)]  # [B, T, W_kv, rep]
            quad = torch.einsum("btkr,krs,btks->btk", sel, gram.to(sel.device), sel).clamp(min=0)
            self._add_rows(f"{layer}.attn_v/impact", self._row_sums(quad.sqrt()))

    def _qk_pair(self, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                 kinds: set[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rotation-free bound: |q_j(t)| Σ_s p ρk_j(s) and ρq_j(t) Σ_s p |k_j(s)| (one matmul each)."""
        kh = k.repeat_interleave(self.geometry.group_size, dim=1)  # query head h reads kv head h // rep
        iq = q.abs() * torch.matmul(p, _pair_norm(kh)) if "attn_q" in kinds else None
        ik = _pair_norm(q) * torch.matmul(p, kh.abs()) if "attn_k" in kinds else None
        return iq, ik

    def _qk_exact(self, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                  kinds: set[str], work: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """|Δ logit| of zeroing a pre-RoPE unit, attention-weighted, for every counted query position.

        Zeroing q_j changes logit (t, s) by −q_j(t)·[R_tᵀ k_rot(s)]_j (the key rotated back into the
        query's rotary frame); zeroing k_j by −k_j(s)·[R_sᵀ q_rot(t)]_j. Exact for models without
        q/k norms, first order through Qwen3/Gemma 3's per-head RMSNorm. Computed in chunks of query
        positions (memory bounded by `chunk_elements`), only where some row counts the position.
        """
        g = self.geometry
        b, h, t, d = q.shape
        cos, sin = (x.detach().to(work) for x in pe)  # [B, T, D]
        if cos.dim() == 2:
            cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        q_rot = q * cos[:, None] + _rotate_half(q) * sin[:, None]  # [B, H, T, D]
        k_rot = k * cos[:, None] + _rotate_half(k) * sin[:, None]  # [B, G, T, D]
        k_rot_half = _rotate_half(k_rot)
        assert self._mask is not None
        rows = torch.nonzero(self._mask.any(0).to(q.device)).flatten()
        iq = torch.zeros_like(q) if "attn_q" in kinds else None
        ik = torch.zeros_like(q) if "attn_k" in kinds else None
        kh_abs = k.abs().repeat_interleave(g.group_size, dim=1)  # [B, H, T, D]
        step = max(1, self.chunk_elements // max(1, b * h * t * d))
        for start in range(0, rows.numel(), step):
            tc = rows[start:start + step]
            pc = p[:, :, tc, :]  # [B, H, c, S]
            c = tc.numel()
            if iq is not None:
                cos_t, sin_t = cos[:, None, tc, None, :], sin[:, None, tc, None, :]  # [B, 1, c, 1, D]
                back = (k_rot[:, :, None] * cos_t - k_rot_half[:, :, None] * sin_t).abs()  # [B, G, c, S, D]
                w = torch.einsum("bgrcs,bgcsd->bgrcd", pc.reshape(b, g.num_kv_heads, g.group_size, c, -1), back)
                iq[:, :, tc] = q[:, :, tc].abs() * w.reshape(b, h, c, d)
            if ik is not None:
                qc = q_rot[:, :, tc, None, :]  # [B, H, c, 1, D]
                back = (qc * cos[:, None, None] - _rotate_half(qc) * sin[:, None, None]).abs()  # [B, H, c, S, D]
                ik[:, :, tc] = torch.einsum("bhcs,bhcsd,bhsd->bhcd", pc, back, kh_abs)
        return iq, ik

    def _impact_hooks(self, stack: ExitStack) -> None:
        ad = self.loaded.adapter
        for layer, kinds in self.impact_layers.items():
            attn = getattr(self.layers[layer], ad.attn)
            if kinds & {"attn_q", "attn_k"}:
                for name, proj, norm in (("q", ad.q_proj, "q_norm"), ("k", ad.k_proj, "k_norm")):
                    # Qwen3 / Gemma 3 normalise each head (RMSNorm over head_dim) before RoPE; the norm acts
                    # on the last dim only, so applying the stock module to our [B, T, heads, D] view gives
                    # what attention uses, whatever layout the model itself normalises in.
                    norm_mod = getattr(attn, norm, None)
                    heads = self.geometry.num_heads if name == "q" else self.geometry.num_kv_heads

                    def capture(m: nn.Module, a: Any, out: torch.Tensor, _l: int = layer, _n: str = name,
                                _h: int = heads, _norm: Any = norm_mod) -> None:
                        x = out.view(*out.shape[:-1], _h, -1)
                        self._buf[(_l, _n)] = _norm(x) if isinstance(_norm, nn.Module) else x

                    stack.callback(getattr(attn, proj).register_forward_hook(capture).remove)

                def capture_pe(m: nn.Module, args: Any, kwargs: Any, _l: int = layer) -> None:
                    pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
                    if isinstance(pe, tuple) and len(pe) == 2:
                        self._buf[(_l, "pe")] = pe

                stack.callback(attn.register_forward_pre_hook(capture_pe, with_kwargs=True).remove)
            if "attn_v" in kinds:
                o = getattr(attn, ad.o_proj)
                stack.callback(o.register_forward_pre_hook(
                    lambda m, args, _l=layer: self._buf.__setitem__((_l, "o_in"), args[0])).remove)
            stack.callback(attn.register_forward_hook(
                lambda m, args, out, _l=layer: self._on_attention(_l, m, out)).remove)

    # --- attaching -------------------------------------------------------------------------------
    @contextmanager
    def attach(self, stop: bool = True) -> Iterator[None]:
        """Install all hooks; with `stop`, the forward pass ends (raising `_StopForward`) after the last
        layer that has a site. Every hook is removed on exit."""
        with ExitStack() as stack:
            stack.enter_context(site_hooks(self.sites, self._on_site))
            if self.impact:
                self._impact_hooks(stack)
            if stop:
                def raise_stop(module: nn.Module, args: Any, output: Any) -> None:
                    raise _StopForward

                stack.callback(self.layers[self.last_layer].register_forward_hook(raise_stop).remove)
            yield

    def check_complete(self) -> None:
        missing = [s.key for s in self.sites if s.key not in self._seen]
        if missing:
            raise RuntimeError(f"hooks did not fire at sites {missing}: the adapter does not match this model")


class _Length:
    """Stands in for an EncodedPrompt in `batches_by_length`, which reads only `len(.input_ids)`."""

    __slots__ = ("input_ids",)

    def __init__(self, n: int) -> None:
        self.input_ids = range(n)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 at each row's first real token (left padding), as `generate` does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collect_statistics(
    loaded: LoadedModel,
    records: Sequence[PromptRecord],
    *,
    sites: Sequence[str] = ("ffn",),
    positions: str = "prompt",
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
    impact: bool | None = None,
    qk_impact: str = "exact",
) -> ActivationStats:
    """Stream `records` through the model once and return the running sums per (site, group).

    Batches mix groups and are sorted by length (`batches_by_length`), left-padded (`model_inputs`, which also adds image inputs for a VLM);
    padding never counts, and only `positions` count (`prompt`, `user`, `last`, `post`). `impact`
    (default: on when `attn_q/k/v` sites are asked for) adds the attention impact sums of the
    `plnd` score, switching attention to the eager implementation for the pass; `qk_impact` is
    `exact` (|Δ logit| with the rotary frames, O(T²·D) per head, chunked) or `pair` (a cheaper upper
    bound, one matmul; see `ActivationCollector`).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose one of {', '.join(POSITIONS)}")
    if not records:
        raise ValueError("no prompts given: statistics need at least one prompt per group")
    images = [r for r in records if r.modality != "text" or r.image]
    if images and not loaded.adapter.multimodal:
        raise ValueError(
            f"{len(images)} image prompts (first: {images[0].id} in {images[0].language}) given to the text model "
            f"{loaded.model_id!r}: use a vision-language model, or drop modality 'image' from the groups"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = loaded.model
    site_list = resolve_sites(model, loaded.adapter, tuple(sites))
    if not site_list:
        raise ValueError(f"no sites of kinds {list(sites)} in this model")
    if impact is None:
        impact = any(s.kind in IMPACT_KINDS for s in site_list)
    groups = sorted({group_name(*r.group) for r in records})
    gindex = {g: i for i, g in enumerate(groups)}
    rec_gid = [gindex[group_name(*r.group)] for r in records]
    # Sorting by length needs only the lengths: prompts are encoded again batch by batch, so no token
    # ids (or pixels) are held for the whole pass (memory stays flat in the number of prompts).
    lengths = [_Length(len(encode_record(loaded, r, max_length=max_length).input_ids)) for r in records]
    collector = ActivationCollector(loaded, site_list, len(groups), impact=impact, qk_impact=qk_impact)
    needs_eager = collector.impact and any(s.kind in ("attn_q", "attn_k") for s in site_list)
    config_hash = loaded.config_hash
    attn_impl = "eager" if needs_eager else getattr(model.config, "_attn_implementation", None)
    batches = batches_by_length(lengths, batch_size)  # type: ignore[arg-type]  # only len(.input_ids) is read
    from tqdm.auto import tqdm

    device = loaded.device
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if needs_eager:
            stack.enter_context(eager_attention(model))
        stack.enter_context(collector.attach(stop=True))
        bar = stack.enter_context(tqdm(total=len(records), desc="activation statistics", unit="prompt",
                                       disable=not progress, leave=False))
        for idx in batches:
            chunk = [encode_record(loaded, records[i], max_length=max_length) for i in idx]
            batch, inputs = model_inputs(loaded, chunk, device=device)
            mask = batch.count_mask(chunk, positions).to(device)
            if not bool(mask.any()):  # e.g. positions="image" on a batch of text rows: nothing to count
                bar.update(len(idx))
                continue
            collector.set_batch(mask, torch.tensor([rec_gid[i] for i in idx], dtype=torch.long, device=device))
            if not loaded.adapter.multimodal:
                # positions restart at each row's first real token, as in `generate`; VLMs compute their own
                # (Qwen2-VL's are 3-D rotary positions built from the image grid)
                inputs["position_ids"] = position_ids_for(batch.attention_mask).to(device)
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            collector.check_complete()
            bar.update(len(idx))
    # one reduction per site block (a NaN or inf anywhere makes the block's sum non-finite)
    checked = list(collector._block.items()) + [(k, v) for k, v in collector.tensors.items() if k.endswith("/impact")]
    bad = [k for k, v in checked if not math.isfinite(float(v.sum()))]
    if bad:
        raise RuntimeError(
            f"non-finite activation sums at {', '.join(bad[:4])}: the model produced inf/NaN at counted tokens. "
            "Known cause: float64 weights with eager attention and left padding (fully masked padding rows give "
            "NaN); use float32/bfloat16, batch_size=1, or check the model"
        )
    prompts = {g: 0 for g in groups}
    for r in records:
        prompts[group_name(*r.group)] += 1
    meta = {
        "model_id": loaded.model_id,
        "config_hash": config_hash,
        "sites": [s.key for s in site_list],
        "widths": {s.key: s.width for s in site_list},
        "site_kinds": sorted({s.kind for s in site_list}),
        "positions": positions,
        "groups": groups,
        "prompts": prompts,
        "data_hashes": group_hashes(records),
        "max_length": max_length,
        "impact": bool(collector.impact),
        "qk_impact": qk_impact if collector.impact else None,
        "attention": attn_impl,
        "dtype": dtype_name(model),
    }
    return ActivationStats(collector.tensors, meta)


__all__ = [
    "ActivationStats", "ActivationCollector", "StatsMismatchError", "collect_statistics", "data_hash",
    "group_hashes", "eager_attention", "position_ids_for", "IMPACT_KINDS",
]
