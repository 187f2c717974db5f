"""Meta-Curvature (Park & Oliva 2019, "Meta-Curvature", NeurIPS; arXiv 1902.03356).

MAML whose inner step goes along a learned linear transform of the gradient,
``θ ← θ − α · MC(∇L)``, with the transform meta-learned in the outer loop together with the
initialisation (second order through the inner loop, as MAML; ``first_order`` drops the
second-order term of the backbone and keeps the gradient to the curvature, for one step
``−α ∇L_val(θ') ∇L_train(θ)ᵀ``). A full matrix over all of a layer's weights would be
enormous, so the paper factors it per tensor with the n-mode (tensor) product: a weight
gradient ``G`` of shape ``[C_out, C_in, k, k]`` is read as ``[C_out, C_in, k²]`` and

    MC(G) = G ×₁ M_o ×₂ M_i ×₃ M_f,   M_o ∈ R^{C_out×C_out}, M_i ∈ R^{C_in×C_in}, M_f ∈ R^{k²×k²}

(``(G ×ₙ M)`` multiplies mode n by ``M``: ``Σ_c M[j, c] G[..., c, ...]``), which is the
Kronecker product ``M_o ⊗ M_i ⊗ M_f`` applied to the row-major ``vec(G)`` without building it.
A linear weight ``[out, in]`` is the ``k² = 1`` case, ``M_o G M_iᵀ`` (no ``M_f``); any other
weight of two or more dimensions is ``[C_out, C_in, rest…]`` with ``rest`` flattened into the
filter mode. Every matrix starts at the identity, so that at initialisation this is MAML.

What was checked, and where our form differs. The paper's text and the official TensorFlow code
(github.com/silverbottlep/maml, linked from github.com/silverbottlep/meta_curvature) could not
be read here; the form above is the paper's abstract ("a series of tensor products") as
learn2learn's ``MetaCurvatureTransform`` implements it (it says it follows the reference
implementation's TensorFlow shapes), and another PyTorch reimplementation agrees.

- Transposes. learn2learn multiplies some modes from the right (``M_o G M_i`` for a linear
  weight, TensorFlow's ``[k, k, C_in, C_out]`` order for a kernel). A learned matrix and its
  transpose are the same family and both start at the identity, so only the meaning of a
  saved matrix differs: ours is the mode product throughout.
- Biases and other 1-D parameters (batch-norm scales and shifts). learn2learn and the other
  reimplementation give a 1-D parameter one learned factor per element (Meta-SGD-like, ones at
  the start). That is our default, ``vector_curvature: elementwise``; ``matrix`` gives it a
  ``C×C`` matrix (``M_o`` alone), ``none`` leaves its gradient as it is.
- Size. Every mode gets a dense matrix, however large: conv4's flattened head on miniImageNet
  (128 filters) has a 3200×3200 input factor.
- The curvature is per adapted parameter, shared by every inner step (as the paper's), and the
  inner step size ``inner_lr`` stays a fixed setting (the paper's α).

The matrices live in the model (``meta_parameters.MetaModel``, group ``curvature``), so the
outer optimizer updates them and checkpoints hold them, as Meta-SGD's rates.
"""

from __future__ import annotations

import torch
from torch import nn

from mamlrun.algorithms.functional import Direction, Params
from mamlrun.algorithms.learner import Meta, configured
from mamlrun.algorithms.maml import MAML
from mamlrun.algorithms.meta_parameters import key
from mamlrun.errors import MamlrunError

#: How a parameter with fewer than two dimensions is transformed (``vector_curvature``).
VECTOR_CURVATURES = ("elementwise", "matrix", "none")
#: The factors of a parameter's curvature, in the order they are applied (mode 1, 2, 3).
FACTORS = ("out", "in", "filter")


@configured("metacurvature")
class MetaCurvature(MAML):
    """MAML's settings plus how 1-D parameters are curved. ``MetaCurvature(inner_lr=0.4)``
    takes the rest from ``conf/meta_optimizer/metacurvature.yaml`` (``configured``).

    Attributes:
        vector_curvature: ``elementwise`` (one learned factor per element, as learn2learn),
            ``matrix`` (a ``C×C`` matrix) or ``none`` (the plain gradient) for
            biases and the other parameters with fewer than two dimensions.
    """

    vector_curvature: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vector_curvature not in VECTOR_CURVATURES:
            raise MamlrunError(
                f"meta_optimizer.vector_curvature must be one of "
                f"{', '.join(VECTOR_CURVATURES)}, got {self.vector_curvature!r}"
            )

    def describe(self) -> dict:
        return {**super().describe(), "vector_curvature": self.vector_curvature}

    def own_meta_parameters(self, backbone: nn.Module, adapted: Params) -> dict[str, nn.Module]:
        """One ``ParameterDict`` of identity factors per adapted parameter that has any
        (``factors``), under the parameter's name (``meta_parameters.key``)."""
        curvature = nn.ModuleDict()
        for name, p in adapted.items():
            factors = self.factors(p)
            if factors:
                curvature[key(name)] = nn.ParameterDict(
                    {f: nn.Parameter(t) for f, t in factors.items()}
                )
        return {"curvature": curvature}

    def factors(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The identity curvature of parameter ``p``: ``out``, ``in`` and (for a filter of
        more than one element) ``filter`` matrices for a weight; ``out`` (a matrix, or a
        vector of ones when elementwise) or nothing for a 1-D or scalar parameter."""
        like = {"dtype": p.dtype, "device": p.device}
        if p.dim() >= 2:
            sizes = {"out": p.shape[0], "in": p.shape[1], "filter": p[0, 0].numel()}
            return {f: torch.eye(n, **like) for f, n in sizes.items() if f != "filter" or n > 1}
        if self.vector_curvature == "elementwise":
            return {"out": torch.ones(p.shape, **like)}
        if self.vector_curvature == "matrix":
            return {"out": torch.eye(p.numel(), **like)}
        return {}

    def inner_direction(self, meta: Meta) -> Direction:
        """Each gradient through its parameter's curvature (``transform``); the gradients
        of parameters without one as they are."""
        curvature: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in meta["curvature"].items():
            parameter, factor = name.rsplit(".", 1)
            curvature.setdefault(parameter.replace(":", "."), {})[factor] = t

        def direction(grads: Params, step: int) -> Params:
            return {
                k: transform(g, curvature[k]) if k in curvature else g for k, g in grads.items()
            }

        return direction


def transform(g: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``MC(g)``: ``g ×₁ M_o ×₂ M_i ×₃ M_f`` for a weight (``g`` read as ``[C_out, C_in,
    rest]``), ``M_o g`` or ``m ⊙ g`` for a 1-D parameter, by ``factors`` (``out``, ``in``,
    ``filter``) as ``MetaCurvature.factors`` makes them."""
    out = factors["out"]
    if g.dim() < 2:
        if out.dim() == g.dim():  # elementwise
            return out * g
        return (out @ g.reshape(-1)).reshape(g.shape)
    c_out, c_in = g.shape[0], g.shape[1]
    grid = g.reshape(c_out, c_in, -1)
    if "filter" in factors:
        grid = torch.einsum("fd,oid->oif", factors["filter"], grid)
    grid = torch.einsum("ji,oid->ojd", factors["in"], grid)
    grid = torch.einsum("po,oid->pid", out, grid)
    return grid.reshape(g.shape)
