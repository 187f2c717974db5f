"""Which parameters adapt in the inner loop: all of them (MAML) or only the head (ANIL).

ANIL (Raghu et al. 2020, "Rapid learning or feature reuse?") adapts only the last linear
layer per task and meta-learns the body in the outer loop only. That is the same inner loop
over a smaller dict of parameters, so it is a choice of names, not another algorithm: the
other parameters enter the forward pass as constants of the inner loop and still receive the
outer gradient through the adapted head.
"""

from __future__ import annotations

from torch import nn

from mamlrun.errors import MamlrunError


def head(backbone: nn.Module) -> str:
    """Name of the last module (in definition order) that holds parameters: the output layer."""
    owners = [
        name
        for name, m in backbone.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    if not owners or owners[-1] == "":
        raise MamlrunError("adapt_params=head needs a backbone whose output layer is a submodule")
    return owners[-1]


def adapted_names(
    backbone: nn.Module, adapt_params: str | list[str], exclude: set[str] = frozenset()
) -> list[str]:
    """Names of the parameters that the inner loop updates, in the backbone's order.

    ``adapt_params`` is ``"all"``, ``"head"``, or a list of name prefixes (``["3."]`` for the
    module named ``3``). ``exclude`` removes names another setting owns (per-step batch-norm
    weights are meta-parameters, not adapted).
    """
    names = [n for n, _ in backbone.named_parameters()]
    if adapt_params == "all":
        prefixes = [""]
    elif adapt_params == "head":
        prefixes = [head(backbone) + "."]
    elif isinstance(adapt_params, list | tuple):
        prefixes = list(adapt_params)
    else:
        raise MamlrunError(
            f"meta_optimizer.adapt_params must be all, head or a list of name prefixes, "
            f"got {adapt_params!r}"
        )
    chosen = [n for n in names if n not in exclude and any(n.startswith(p) for p in prefixes)]
    if not chosen:
        raise MamlrunError(
            f"meta_optimizer.adapt_params={adapt_params!r} selects no parameter of the backbone "
            f"(its parameters: {', '.join(names)})"
        )
    return chosen
