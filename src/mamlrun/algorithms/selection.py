"""Which parameters adapt in the inner loop: all of them (MAML), only the head (ANIL) or all
but the head (BOIL).

ANIL (Raghu et al. 2020, "Rapid learning or feature reuse?") adapts only the last linear
layer per task and meta-learns the body in the outer loop only; BOIL (Oh et al. 2021, "Body
Only update in Inner Loop") is its mirror: the head stays frozen in the inner loop, so the
features must move to it, and is learned in the outer loop only. Either is the same inner loop
over a smaller dict of parameters, so it is a choice of names, not another algorithm: the
other parameters enter the forward pass as constants of the inner loop and still receive the
outer gradient through the adapted ones. The head is found the same way for both (the last
module holding parameters), on any backbone, never by per-backbone name prefixes.
"""

from __future__ import annotations

from torch import nn

from mamlrun.errors import MamlrunError


def head(backbone: nn.Module, setting: str = "head") -> str:
    """Name of the last module (in definition order) that holds parameters: the output layer
    (``setting`` names the ``adapt_params`` value asking, for the error)."""
    owners = [
        name
        for name, m in backbone.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    if not owners or owners[-1] == "":
        raise MamlrunError(
            f"adapt_params={setting} needs a backbone whose output layer is a submodule"
        )
    return owners[-1]


def adapted_names(
    backbone: nn.Module, adapt_params: str | list[str], exclude: set[str] = frozenset()
) -> list[str]:
    """Names of the parameters that the inner loop updates, in the backbone's order.

    ``adapt_params`` is ``"all"``, ``"head"``, ``"body"`` (all but the head) or a list of name
    prefixes (``["3."]`` for the module named ``3``). ``exclude`` removes names another setting
    owns (per-step batch-norm weights are meta-parameters, not adapted).
    """
    names = [n for n, _ in backbone.named_parameters()]
    if adapt_params == "all":
        prefixes = [""]
    elif adapt_params in ("head", "body"):
        prefixes = [head(backbone, adapt_params) + "."]
    elif isinstance(adapt_params, list | tuple):
        prefixes = list(adapt_params)
    else:
        raise MamlrunError(
            f"meta_optimizer.adapt_params must be all, head, body or a list of name prefixes, "
            f"got {adapt_params!r}"
        )
    chosen = [n for n in names if n not in exclude and any(n.startswith(p) for p in prefixes)]
    if adapt_params == "body":
        chosen = [n for n in names if n not in exclude and not n.startswith(prefixes[0])]
    if not chosen:
        raise MamlrunError(
            f"meta_optimizer.adapt_params={adapt_params!r} selects no parameter of the backbone "
            f"(its parameters: {', '.join(names)})"
        )
    return chosen
