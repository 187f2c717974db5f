"""CAVIA (Zintgraf et al. 2019, "Fast Context Adaptation via Meta-Learning", ICML).

The network is split in two: a small vector of context parameters φ, the only thing the inner
loop adapts, and everything else (the backbone and the map from φ into it), meta-learned in
the outer loop only. φ starts at zero for every task, always: it is not meta-learned, so what
a task learns is all in φ and the network has to make zero mean "no task yet". The outer
objective is MAML's (the query loss after the inner steps), so CAVIA is ``maml.MAML`` with a
different model and a different start for the adapted parameters; second and first order,
and every batching mode, come with it.

Where φ enters, as in the paper and its code (github.com/lmzintgraf/cavia):

- a network without batch norm (the sinusoid MLP): φ is concatenated to the input of the
  first linear layer. Written as an extra weight on that layer (``W·[x, φ] = W_x·x + W_φ·φ``),
  the backbone stays as it is.
- a convolutional network: FiLM after a batch-norm layer (the ``context_layer``-th, 1-based;
  the paper's is conv4's third block), before its nonlinearity: ``h·γ(φ) + β(φ)``, with
  ``[γ, β]`` a linear map of φ (one per channel). Its bias starts at γ = 1, β = 0, so that
  at φ = 0 the network computes what the backbone alone computes (the official code keeps
  PyTorch's random bias there instead).

How it fits the shared inner loop with no change to it: ``meta_model`` wraps the backbone in
``Contextual``, whose parameters are the backbone's, the map's (``modulation``) and φ
(``context``); a forward hook reads the wrapper's ``context``, which ``functional_call``
substitutes (per task under ``vmap``), so the adapted φ is the one the network sees. The inner
loop adapts ``adapt_params=[context]``, and ``meta_tensors`` hands it a fresh zero φ for every
call instead of the stored one, which stays zero and never receives a gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from mamlrun.algorithms.learner import Meta, configured
from mamlrun.algorithms.maml import MAML
from mamlrun.errors import MamlrunError
from mamlrun.models.layers import batch_norm_layers

#: The parameter the inner loop adapts, by its name in ``Contextual``.
CONTEXT = "context"


class Contextual(nn.Module):
    """A backbone with context parameters φ (``context``) entering it at one layer through
    ``modulation``: FiLM after the batch-norm layer ``film_at`` names, or, without one
    (``film_at=None``), concatenated to the input of the first linear layer."""

    def __init__(self, backbone: nn.Module, context_size: int, film_at: str | None) -> None:
        super().__init__()
        first = next(backbone.parameters())
        like = {"dtype": first.dtype, "device": first.device}
        self.backbone = backbone
        self.context = nn.Parameter(torch.zeros(context_size, **like), requires_grad=False)
        if film_at is not None:
            layer = dict(backbone.named_modules())[film_at]
            channels = layer.weight.shape[0]
            self.modulation = nn.Linear(context_size, 2 * channels, **like)
            with torch.no_grad():  # the official code's weights; γ = 1, β = 0 at φ = 0
                nn.init.kaiming_uniform_(self.modulation.weight, nonlinearity="linear")
                self.modulation.bias.copy_(torch.cat([torch.ones(channels), torch.zeros(channels)]))
            layer.register_forward_hook(self._film)
        else:
            layer = next(m for m in backbone.modules() if isinstance(m, nn.Linear))
            self.modulation = nn.Linear(context_size, layer.out_features, bias=False, **like)
            layer.register_forward_hook(self._concatenated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    # Bound methods, so that a deep copy of the model (``threads`` makes one per worker)
    # hooks its own copy's context, not this one's.
    def _film(self, module: nn.Module, inputs, h: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(self.context).chunk(2)
        return h * gamma[:, None, None] + beta[:, None, None]

    def _concatenated(self, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        return out + self.modulation(self.context)


@configured("cavia")
class CAVIA(MAML):
    """MAML's settings plus CAVIA's own (``conf/meta_optimizer/cavia.yaml``).

    Attributes:
        context_size: the number of context parameters φ (the paper: 5 for the sinusoid,
            100 for miniImageNet).
        context_layer: on a network with batch norm, after which of its batch-norm layers
            (1-based, in definition order) FiLM applies the context: 3 is conv4's third block,
            as in the paper; ResNet-12 has four per block (three on its main path, then the
            shortcut's). A network without batch norm (the MLP) takes φ with its input, as the
            paper's regression does, and does not read it.
    """

    context_size: int
    context_layer: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context_size < 1 or self.context_layer < 1:
            raise MamlrunError(
                "meta_optimizer.context_size and context_layer must be >= 1, got "
                f"{self.context_size} and {self.context_layer}"
            )
        if isinstance(self.adapt_params, str) or list(self.adapt_params) != [CONTEXT]:
            raise MamlrunError(
                f"CAVIA adapts only its context in the inner loop (adapt_params=[{CONTEXT}]), "
                f"got adapt_params={self.adapt_params!r}"
            )

    def meta_model(self, backbone: nn.Module) -> nn.Module:
        """The backbone with context parameters (``Contextual``), plus MAML's extras."""
        return super().meta_model(Contextual(backbone, self.context_size, self._film_at(backbone)))

    def meta_tensors(self, model: nn.Module) -> Meta:
        """MAML's, with a fresh zero context in place of the stored one: every task starts
        from φ = 0, and the outer gradient reaches the network only, never a φ to start from."""
        meta = super().meta_tensors(model)
        stored = meta["theta"][CONTEXT]
        fresh = torch.zeros_like(stored, requires_grad=True)
        return {**meta, "theta": {**meta["theta"], CONTEXT: fresh}}

    def describe(self) -> dict:
        return {**super().describe(), "context_size": self.context_size}

    def _film_at(self, backbone: nn.Module) -> str | None:
        """The name of the batch-norm layer FiLM follows; None for a network without batch
        norm (its first linear layer takes φ)."""
        layers = list(batch_norm_layers(backbone))
        if not layers:
            if not any(isinstance(m, nn.Linear) for m in backbone.modules()):
                raise MamlrunError(
                    "CAVIA needs a backbone with batch-norm layers (for FiLM) or a linear layer "
                    "(to take the context with its input)"
                )
            return None
        if self.context_layer > len(layers):
            raise MamlrunError(
                f"meta_optimizer.context_layer={self.context_layer}, but the backbone has "
                f"{len(layers)} batch-norm layers ({', '.join(layers)})"
            )
        return layers[self.context_layer - 1]
