"""Stage 2: per-neuron scores from the streaming statistics of one group (or a contrast of two).

Methods (`SCORE_METHODS`); a = the unit's activation at a counted token, mean over counted tokens:

`precise-shield` (Precise Shield saliency; FFN, reconstructed from secondary descriptions)
    s(l, i) = |mean a(l, i)| · ‖W_down[:, i]‖₂,  divided by Σ_i of the same over the layer, so a
    layer's scores sum to 1. Also defined for `attn_o` (W = o_proj) as a documented extension;
    q/k/v sites have no saliency and are skipped.

`plnd` (deactivation importance, SS-Neurons / SN-Tune): the mean over counted tokens of the norm of
    the change of the module's output when the unit is zeroed.
    - `ffn`, `attn_o`: the output changes by −a_i(t) · W[:, i], whose norm is |a_i(t)| · ‖W[:, i]‖₂,
      so the mean is mean|a_i| · ‖W[:, i]‖₂: exact, from Σ|a| alone (W = down_proj / o_proj).
    - `attn_q`, `attn_k`: the module output is the attention logits (scaled q·k, before the mask
      and soft-capping). Zeroing unit j changes logit (h, t, s) by
      −scaling · q_j(t) · [R_tᵀ k_rot(s)]_j  (q unit; R the rotary rotation), and by
      −scaling · k_j(s) · [R_sᵀ q_rot_h(t)]_j  (k unit, every query head h that reads its kv head).
      importance = mean over counted query tokens t of Σ_h Σ_s p_h(t, s) · |Δ logit(h, t, s)|
      (the attention-weighted |q_j k_j|·scaling of the method, in the right rotary frame; exact
      without q/k norms, first order through Qwen3/Gemma 3's per-head RMSNorm). With
      `qk_impact="pair"` statistics, the rotation-free bound ρ = sqrt(x_j² + x_pair(j)²) replaces the
      rotated factor. See `neuroshield.neurons.stats` for how the sums are gathered.
    - `attn_v`: value unit j (kv head g, dim d) is read by every query head of its group, and zeroing
      it zeroes exactly the `o_proj` inputs Q(j) = `geometry.query_units_of_kv_unit(j)`. The `o_proj`
      output changes by −Σ_{u∈Q(j)} a_u(t) W_o[:, u]; importance = mean_t ‖that‖₂ (exact).

`mean-diff` (contrast baseline): mean_harmful(a) − mean_benign(a), signed.

`t-stat` (contrast baseline): Welch's t over counted tokens,
    (m_h − m_b) / sqrt(v_h/n_h + v_b/n_b), v the unbiased token variance. Tokens of one prompt are
    not independent: read it as a standardised effect, not as a test.

Importance methods (`precise-shield`, `plnd`) score one group; selection takes top-ρ under the harmful
group minus top-ρ under the benign group. Contrast methods score a pair of groups directly.
"""

from __future__ import annotations

from typing import Any

import torch

from neuroshield.data.records import group_name
from neuroshield.models.loading import LoadedModel
from neuroshield.models.sites import Site, parse_site_key, resolve_sites
from neuroshield.neurons.stats import IMPACT_KINDS, ActivationStats

IMPORTANCE_METHODS = ("plnd", "precise-shield")
CONTRAST_METHODS = ("mean-diff", "t-stat")
SCORE_METHODS = IMPORTANCE_METHODS + CONTRAST_METHODS
# site kinds each method can score
METHOD_KINDS: dict[str, tuple[str, ...]] = {
    "plnd": ("ffn", "attn_q", "attn_k", "attn_v", "attn_o"),
    "precise-shield": ("ffn", "attn_o"),
    "mean-diff": ("ffn", "attn_q", "attn_k", "attn_v", "attn_o"),
    "t-stat": ("ffn", "attn_q", "attn_k", "attn_v", "attn_o"),
}


def check_method(method: str) -> str:
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown scoring method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    return method


def is_contrast(method: str) -> bool:
    return check_method(method) in CONTRAST_METHODS


def _site_objects(stats: ActivationStats, loaded: LoadedModel) -> dict[str, Site]:
    stats.check_model(loaded)
    kinds = tuple(sorted({parse_site_key(k)[1] for k in stats.sites()}))
    return {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, kinds)}


NORM_BLOCK_COLUMNS = 256
"""`column_norms` casts this many columns at a time to float64, not the whole matrix."""


def column_norms(site: Site) -> torch.Tensor:
    """‖W[:, i]‖₂ of the matrix that reads the units (down_proj for ffn, o_proj for attn_o), float64.

    Over blocks of `NORM_BLOCK_COLUMNS` columns (the same values bit for bit as the whole matrix at once): a float64
    copy of a whole down_proj (35 MB on the default model, 7 MB on SmolLM2) for every site, group, language and
    method left the allocator's heap ~100-170 MB larger after scoring (SmolLM2, identify; tensors: 20 MB).
    """
    if site.hook != "input":
        raise ValueError(f"site {site.key}: units are outputs of {site.module_name}; no reading matrix")
    w = site.module.weight.detach()
    step = NORM_BLOCK_COLUMNS
    return torch.cat([w[:, j:j + step].to(torch.float64).norm(dim=0) for j in range(0, w.shape[1], step)]).cpu()


def benign_counterpart(group: str | tuple[str, str, str], benign_label: str = "benign") -> str:
    """`en/text/harmful` -> `en/text/benign`."""
    if isinstance(group, tuple):
        group = group_name(*group)
    lang, modality, _ = group.split("/")
    return group_name(lang, modality, benign_label)


def score(
    stats: ActivationStats,
    loaded: LoadedModel | None,
    method: str,
    group: str | tuple[str, str, str],
    baseline: str | tuple[str, str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores per site key (float64, one per unit) for `group` under `method` (see module docs).

    Sites of kinds the method does not define are left out. For contrast methods `baseline` is the
    benign group (default: `group` with label `benign`); `loaded` may then be None.
    """
    check_method(method)
    kinds = METHOD_KINDS[method]
    keys = [k for k in stats.sites() if parse_site_key(k)[1] in kinds]
    if not keys:
        raise ValueError(
            f"method {method!r} scores site kinds {', '.join(kinds)}; the statistics hold "
            f"{', '.join(stats.meta['site_kinds'])}"
        )
    out: dict[str, torch.Tensor] = {}
    if method in CONTRAST_METHODS:
        base = baseline if baseline is not None else benign_counterpart(group)
        for k in keys:
            m1, m2 = stats.mean(group, k), stats.mean(base, k)
            if method == "mean-diff":
                out[k] = (m1 - m2).cpu()
            else:
                n1, n2 = stats.count(group), stats.count(base)
                se = (stats.var(group, k) / max(n1, 1) + stats.var(base, k) / max(n2, 1)).sqrt()
                out[k] = ((m1 - m2) / se.clamp(min=1e-12)).cpu()
        return out
    if baseline is not None:
        raise ValueError(f"method {method!r} scores one group; baseline= is for {', '.join(CONTRAST_METHODS)}")
    if loaded is None:
        raise ValueError(f"method {method!r} needs the model (weight norms)")
    sites = _site_objects(stats, loaded)
    for k in keys:
        site = sites[k]
        if method == "precise-shield":
            sal = stats.mean(group, k).abs().cpu() * column_norms(site)
            total = sal.sum()
            out[k] = sal / total if total > 0 else sal
        elif site.kind in IMPACT_KINDS:
            if not stats.has_impact:
                raise ValueError(
                    f"plnd at {k} needs attention impact sums; collect statistics with impact=True"
                )
            out[k] = stats.mean_impact(group, k).cpu()
        else:
            out[k] = stats.mean_abs(group, k).cpu() * column_norms(site)
    return out


def score_groups(
    stats: ActivationStats, loaded: LoadedModel | None, method: str, groups: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """`score` for each group (importance methods), keyed by group name."""
    return {g: score(stats, loaded, method, g) for g in groups}


def describe_method(method: str) -> dict[str, Any]:
    return {"method": method, "kinds": list(METHOD_KINDS[check_method(method)]),
            "contrast": method in CONTRAST_METHODS}


__all__ = ["SCORE_METHODS", "IMPORTANCE_METHODS", "CONTRAST_METHODS", "METHOD_KINDS", "score", "score_groups",
           "column_norms", "benign_counterpart", "is_contrast", "check_method", "describe_method"]
