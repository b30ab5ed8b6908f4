"""One way to hook sites: a context manager that always removes its hooks.

`fn(site, units)` receives the [batch, seq, width] unit tensor of a site. Returning None observes;
returning a tensor of the same shape replaces the units (interventions). Stock modules only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from neuroshield.models.sites import Site

SiteFn = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


@contextmanager
def site_hooks(sites: Sequence[Site], fn: SiteFn) -> Iterator[None]:
    handles = []
    try:
        for site in sites:
            if site.hook == "input":

                def pre_hook(module, args, _site=site):  # type: ignore[no-untyped-def]
                    new = fn(_site, args[0])
                    return None if new is None else (new, *args[1:])

                handles.append(site.module.register_forward_pre_hook(pre_hook))
            else:

                def post_hook(module, args, output, _site=site):  # type: ignore[no-untyped-def]
                    return fn(_site, output)

                handles.append(site.module.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()
