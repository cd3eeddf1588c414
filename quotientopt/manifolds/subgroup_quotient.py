r"""Factor pairs modulo a Lie subgroup :math:`H \subset GL(k)`: architecture-aware head symmetries.

The full :math:`GL(k)` acts on a QK sector :math:`(A, B) = (W_Q, W_K)` only when nothing sits
between the query and key projections. Rotary position embeddings (RoPE) rotate queries and keys by
position-dependent :math:`k \times k` rotations :math:`R_i`, and the score
:math:`x A R_i (y B R_j)^\top = x A R_i R_j^\top B^\top y^\top` is invariant under
:math:`(A, B) \mapsto (A G, B G^{-\top})` exactly when :math:`G R_{i-j} G^{-1} = R_{i-j}` for
every relative position, i.e. when :math:`G` commutes with every RoPE rotation. With distinct
frequencies that commutant is one *scaled rotation* :math:`a I_2 + b J` (:math:`J = [[0, -1],
[1, 0]]`) per frequency pair: a group of real dimension :math:`k` (:func:`rope_generators`).
Since :math:`J^\top = -J`, :math:`(a I + b J)^{-\top} = (a I - b J)^{-1}` is again a scaled
rotation, so :math:`B G^{-\top}` is rotated compatibly as well. With QK-norm (RMSNorm over the head
dimension, no gain) only :math:`O(k)` survives (:func:`orthogonal_generators`); for orthogonal
:math:`O`, :math:`O^{-\top} = O`, so :math:`(A O, B O)` is the :math:`GL(k)` action restricted to
:math:`O(k)`.

:class:`SubgroupFactorQuotient` keeps the total space, the preconditioned metric
:math:`g_Z(\xi, \eta) = \mathrm{tr}(P \xi_A^\top \eta_A) + \mathrm{tr}(Q \xi_B^\top \eta_B)`
(:math:`P = B^\top B`, :math:`Q = A^\top A`), the Riemannian gradient and the retraction of
:class:`~quotientopt.manifolds.FactorQuotient`, and quotients by :math:`H` instead of
:math:`GL(k)`. :math:`H` is given by a basis :math:`E_1, \dots, E_r` of its Lie algebra
:math:`\mathfrak{h}`; the vertical space is :math:`\{(A E, -B E^\top) : E \in \mathfrak{h}\}`.

Horizontal projection. With :math:`V(E) = (A E, -B E^\top)`,
:math:`C_A = A^\top \xi_A`, :math:`C_B = B^\top \xi_B`:

.. math::

    g(\xi, V(E)) = \mathrm{tr}(P C_A^\top E) - \mathrm{tr}(Q C_B^\top E^\top)
                 = \langle C_A P - Q C_B^\top,\; E \rangle_F,

    g(V(E_i), V(E_j)) = \mathrm{tr}(P E_i^\top Q E_j) + \mathrm{tr}(Q E_i P E_j^\top)
                      = 2 \langle E_i,\; Q E_j P \rangle_F,

the last step because :math:`X \mapsto Q X P` is Frobenius-self-adjoint. The projection is
:math:`\xi - V(\sum_i c_i E_i)` with :math:`M c = b`, :math:`M_{ij} = 2 \langle E_i, Q E_j P
\rangle_F` (SPD for full-rank factors), :math:`b_i = \langle C_A P - Q C_B^\top, E_i \rangle_F`:
pure :math:`k \times k` algebra, batched over heads with the generators stacked (no loop). For
:math:`\mathfrak{h} = \mathfrak{gl}(k)` the solution is
:math:`W = \tfrac12 (Q^{-1} C_A - C_B^\top P^{-1})`, FactorQuotient's closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from quotientopt.linalg import compute_dtype
from quotientopt.manifolds._common import CheckResult
from quotientopt.manifolds.factor_quotient import FactorQuotient, Grams

__all__ = [
    "SubgroupFactorQuotient",
    "full_generators",
    "orthogonal_generators",
    "rope_generators",
]

Pairing = Literal["interleaved", "half"]


# ------------------------------------------------------------------------------ generators
def rope_pairs(k: int, pairing: Pairing = "interleaved") -> list[tuple[int, int]]:
    """The head-dimension pairs ``(i, j)`` that RoPE rotates together, in frequency order.

    * ``"interleaved"`` (RoFormer, GPT-J): pair ``p`` is ``(2p, 2p + 1)``;
    * ``"half"`` (GPT-NeoX, LLaMA ``rotate_half``): pair ``p`` is ``(p, p + k/2)``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or k % 2:
        raise ValueError(
            f"rope_generators: k must be a positive even int (RoPE rotates pairs of head "
            f"dimensions), got {k!r}; use an even head dimension."
        )
    if pairing == "interleaved":
        return [(2 * p, 2 * p + 1) for p in range(k // 2)]
    if pairing == "half":
        return [(p, p + k // 2) for p in range(k // 2)]
    raise ValueError(
        f"rope_generators: unknown pairing {pairing!r}; use 'interleaved' (dims 2i, 2i+1; "
        "RoFormer/GPT-J) or 'half' (dims i, i + k/2; GPT-NeoX/LLaMA rotate_half)."
    )


def rope_generators(
    k: int, pairing: Pairing = "interleaved", *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    r"""Basis of the Lie algebra of the commutant of RoPE: shape ``(k, k, k)``.

    For each frequency pair ``(i, j)`` (see :func:`rope_pairs` for the layout), two generators:
    the identity on the pair (``E[i, i] = E[j, j] = 1``, a scaling) and
    :math:`J = [[0, -1], [1, 0]]` on it (``E[i, j] = -1``, ``E[j, i] = 1``, a rotation), in the
    order ``[I_0, J_0, I_1, J_1, ...]``. Their exponentials are the block scaled rotations
    :math:`a I_2 + b J` that commute with every RoPE rotation when the frequencies are distinct
    (equal frequencies would enlarge the symmetry to :math:`GL` of the merged block).
    """
    pairs = rope_pairs(k, pairing)
    gens = torch.zeros(k, k, k, dtype=dtype)
    for p, (i, j) in enumerate(pairs):
        gens[2 * p, i, i] = gens[2 * p, j, j] = 1.0
        gens[2 * p + 1, i, j], gens[2 * p + 1, j, i] = -1.0, 1.0
    return gens


def orthogonal_generators(k: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""Basis :math:`E_{ij} - E_{ji}` (:math:`i < j`) of the skew-symmetric matrices
    :math:`\mathfrak{o}(k)`: shape ``(k (k - 1) / 2, k, k)`` (empty for ``k = 1``).

    The QK-norm symmetry :math:`(A O, B O)` equals the :math:`GL(k)` action
    :math:`(A O, B O^{-\top})` because :math:`O^{-\top} = O`.
    """
    _check_k(k, "orthogonal_generators")
    rows, cols = torch.triu_indices(k, k, offset=1)
    gens = torch.zeros(rows.numel(), k, k, dtype=dtype)
    index = torch.arange(rows.numel())
    gens[index, rows, cols] = 1.0
    gens[index, cols, rows] = -1.0
    return gens


def full_generators(k: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The matrix units :math:`E_{ij}` (row-major): a basis of :math:`\mathfrak{gl}(k)`,
    shape ``(k^2, k, k)``. With it :class:`SubgroupFactorQuotient` is :class:`FactorQuotient`."""
    _check_k(k, "full_generators")
    return torch.eye(k * k, dtype=dtype).reshape(k * k, k, k)


def _check_k(k: int, where: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{where}: k must be a positive int (the head dimension), got {k!r}.")


# ------------------------------------------------------------------------------ the manifold
class SubgroupFactorQuotient(FactorQuotient):
    r"""Factor pairs :math:`Z = [A; B]` modulo a Lie subgroup :math:`H \subset GL(k)` acting as
    :math:`(A G, B G^{-\top})`.

    Parameters
    ----------
    n, m : int
        Rows of :math:`A` and :math:`B`; a point has shape ``(..., n + m, k)``, ``k <= min(n, m)``,
        and ``k`` must equal the generators' ``k``.
    generators : tensor ``(r, k, k)``
        A basis of the Lie algebra :math:`\mathfrak{h}` (real, finite, linearly independent; e.g.
        :func:`rope_generators`, :func:`orthogonal_generators`, :func:`full_generators`). Only
        their span matters: it is orthonormalized (Frobenius) once, in float64, so the conditioning
        of the projection depends on the point, not on how the basis was scaled.
    metric : ``"preconditioned"``
        The only supported metric (``"inv"`` raises ``ValueError``).
    damping, check, row_reduce, sector_rows
        As for :class:`FactorQuotient`. ``check`` additionally tests (at construction, with
        random elements) that the span is closed under the commutator, i.e. is a Lie algebra.
        With ``damping > 0`` only the elements of :math:`H` that are conformal-orthogonal
        (:math:`\mathbb{R}_{>0} \times O(k)`) remain exact symmetries of the metric.
    name : str, optional
        A label for the group (``"rope"``, ``"qk-norm"``), shown in ``repr`` and error messages.
    fast_paths : bool
        When the span is all of :math:`\mathfrak{gl}(k)` (``r = k^2``) or all of
        :math:`\mathfrak{o}(k)` (``r = k(k-1)/2`` skew generators), solve in closed form in
        :math:`O(k^3)` instead of assembling the ``r x r`` system (:math:`O(k^5)` for these):
        FactorQuotient's formula, resp. the generalized Lyapunov equation of
        :meth:`_orthogonal_generator`. ``False`` forces the generic solve (used by the tests to
        cross-check the two).

    Notes
    -----
    Vertical space :math:`\{(A E, -B E^\top) : E \in \mathfrak{h}\}`; ``proju`` subtracts the
    metric-orthogonal projection onto it, from the ``r x r`` system described in the module
    docstring, solved in float32 or better. Cost per head: :math:`O(r k^3 + r^2 k^2)` and
    :math:`r k^2` memory; for the whole :math:`GL(k)` (``r = k^2``) use :class:`FactorQuotient`'s
    closed form instead. ``egrad2rgrad`` is FactorQuotient's: for a loss invariant under
    :math:`H` it is horizontal for this manifold and :math:`H`-equivariant.
    """

    name = "SubgroupFactorQuotient"

    def __init__(
        self,
        n: int,
        m: int,
        generators: torch.Tensor,
        *,
        metric: str = "preconditioned",
        damping: float = 0.0,
        check: bool = True,
        name: str | None = None,
        fast_paths: bool = True,
        row_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sector_rows: tuple[int, int] | None = None,
    ) -> None:
        if metric != "preconditioned":
            raise ValueError(
                f"SubgroupFactorQuotient: metric {metric!r} is not supported; the subgroup "
                "projection is implemented for metric='preconditioned' only (use FactorQuotient "
                "for the 'inv' metric with the full GL(k))."
            )
        super().__init__(
            n,
            m,
            metric="preconditioned",
            damping=damping,
            check=check,
            row_reduce=row_reduce,
            sector_rows=sector_rows,
        )
        if name is not None and not isinstance(name, str):
            raise ValueError(f"SubgroupFactorQuotient: name must be a str or None, got {name!r}.")
        self.group_name = name
        if name is not None:
            self.name = f"SubgroupFactorQuotient({name})"
        gens = _validate_generators(generators, check, self.name)
        self.k = gens.shape[-1]
        self.register_buffer("generators", gens, persistent=False)
        # Frobenius-orthonormal basis of the same span (QR of the flattened generators, float64)
        flat = gens.reshape(gens.shape[0], self.k * self.k).T
        basis = torch.linalg.qr(flat).Q.T.reshape(gens.shape) if gens.shape[0] else gens
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("scaling_blocks", _scaling_blocks(gens, basis), persistent=False)
        r, k = gens.shape[0], self.k
        self.structure = "generic"
        if fast_paths and r == k * k:
            self.structure = "full"
        elif fast_paths and r == k * (k - 1) // 2 and r > 0:
            asym = float((gens + gens.mT).abs().max())
            if asym <= 1e-12 * float(gens.abs().max()):
                self.structure = "orthogonal"

    @property
    def group_dimension(self) -> int:
        """Dimension ``r`` of :math:`H` (the number of generators)."""
        return int(self.generators.shape[0])

    def quotient_dimension(self, k: int) -> int:
        r"""Dimension of one head's quotient by :math:`H`: :math:`(n + m) k - r`, with
        :math:`r` = :attr:`group_dimension` and the whole sector's rows :math:`(n, m)`
        (:attr:`sector_rows`)."""
        n, m = self.sector_rows
        return (n + m) * k - self.group_dimension

    def extra_repr(self) -> str:
        label = "" if self.group_name is None else f", name={self.group_name!r}"
        return (
            f"{super().extra_repr()}, k={self.k}, group_dimension={self.group_dimension}, "
            f"structure={self.structure!r}{label}"
        )

    def _check_shape(self, shape: tuple[int, ...], name: str) -> CheckResult:
        ok, reason = super()._check_shape(shape, name)
        if ok and shape[-1] != self.k:
            return False, (
                f"`{name}` has k = {shape[-1]} columns but the generators of {self.name} are "
                f"{self.k} x {self.k}; build the manifold with generators for k = {shape[-1]} (e.g. "
                f"rope_generators({shape[-1]})) or pass points with {self.k} columns."
            )
        return ok, reason

    # ------------------------------------------------------- what depends on the group H
    def momentum_map(
        self, z: torch.Tensor, v: torch.Tensor, *, grams: Grams | None = None
    ) -> torch.Tensor:
        r"""The momentum map of :math:`H`: the Frobenius projection onto :math:`\mathfrak{h}` of
        FactorQuotient's :math:`J = A^\top v_A P - Q v_B^\top B`, so that
        :math:`g(v, V(E)) = \langle J_{\mathfrak{h}}, E\rangle_F` for every :math:`E \in
        \mathfrak{h}`; zero exactly when ``v`` is horizontal for this manifold."""
        j = super().momentum_map(z, v, grams=grams)
        if self.structure == "full":
            return j
        e = self._basis(j)
        return torch.einsum("...r,rkl->...kl", torch.einsum("rkl,...kl->...r", e, j), e)

    @property
    def balancing_element(
        self,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        r"""The :class:`~quotientopt.manifolds.protocol.Balancing` capability: ``z`` -> the most
        balancing move :math:`(M_A, M_B = M_A^{-\top})` that :math:`H` contains.

        * :math:`H = GL(k)` (``structure == "full"``): FactorQuotient's, the balanced
          representative;
        * :math:`H` contains scalings of disjoint blocks of head dimensions (RoPE: one per
          frequency pair; QK-norm's conformal group: all dimensions at once): each block
          :math:`b` is scaled by :math:`c_b = (\|B_b\|_F / \|A_b\|_F)^{1/2}`, i.e.
          :math:`M_A = \mathrm{diag}(c)`, :math:`M_B = \mathrm{diag}(c)^{-1}`, which equalizes the
          factor norms block by block (the trace of the charge vanishes on each block).

        ``None`` (absent) where :math:`H` has no such move (e.g. :math:`O(k)`, which preserves
        both factor norms) or the rows are sharded. Rank-deficient heads get non-finite
        matrices, as in FactorQuotient."""
        if self.row_reduce is not None or not self._has_balancing_move:
            return None
        return self._balancing_element

    @property
    def _has_balancing_move(self) -> bool:
        return self.structure == "full" or self.scaling_blocks.shape[0] > 0

    def _balancing_element(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.structure == "full":
            return super()._balancing_element(z)
        dtype = compute_dtype(z.dtype)
        a, b = (f.to(dtype) for f in self.factors(z))
        blocks = self.scaling_blocks.to(dtype=dtype, device=z.device)  # (nb, k) indicators
        norm_a = a.square().sum(-2) @ blocks.mT  # (..., nb)
        norm_b = b.square().sum(-2) @ blocks.mT
        scale = (norm_b / norm_a).pow(0.25) @ blocks + (1 - blocks.sum(0))  # (..., k)
        return torch.diag_embed(scale), torch.diag_embed(1 / scale)

    def balancing_transform(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        r"""The most balancing move that :math:`H` contains (:attr:`balancing_element`), or
        ``None`` where :math:`H` has none. Deprecated: ask ``isinstance(manifold, Balancing)``
        and call :attr:`balancing_element`."""
        if self.structure == "full":
            return super().balancing_transform(z)
        if not self._has_balancing_move:
            return None
        if self.row_reduce is not None:
            raise ValueError(
                f"{self.name}.balancing_transform needs whole factors, but this manifold's rows "
                "are sharded (row_reduce is set); gather the shards first"
            )
        return self._balancing_element(z)

    def balance(self, z: torch.Tensor) -> torch.Tensor:
        r"""The representative reached by :meth:`balancing_transform` (``z`` itself where
        :math:`H` has no balancing move); the product is unchanged."""
        if self.structure == "full":
            return super().balance(z)
        transform = self.balancing_transform(z)
        if transform is None:
            return z.clone()
        return self.right_multiply(z, *transform)

    # ---------------------------------------------------------------------- the geometry
    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        return self.basis.to(dtype=like.dtype, device=like.device)

    def vertical_from_coefficients(
        self, z: torch.Tensor, coefficients: torch.Tensor
    ) -> torch.Tensor:
        r"""The vertical vector :math:`V(\sum_i c_i E_i)` for coefficients ``(..., r)`` in the
        basis of the *given* generators (not the internal orthonormalized one)."""
        gens = self.generators.to(dtype=compute_dtype(z.dtype), device=z.device)
        omega = torch.einsum("...r,rij->...ij", coefficients.to(gens.dtype), gens)
        return self.vertical(z, omega)

    def vertical_gram(self, z: torch.Tensor, *, grams: Grams | None = None) -> torch.Tensor:
        r""":math:`M_{ij} = g(V(E_i), V(E_j)) = 2 \langle E_i, Q E_j P \rangle_F` for the
        internal orthonormal basis, shape ``(..., r, r)`` (SPD at full-rank points)."""
        grams = self.grams(z) if grams is None else grams
        return self._vertical_gram(grams)

    def _vertical_gram(self, grams: Grams) -> torch.Tensor:
        e = self._basis(grams.p)
        qep = grams.q[..., None, :, :] @ e @ grams.p[..., None, :, :]  # (..., r, k, k)
        return 2.0 * torch.einsum("ikl,...jkl->...ij", e, qep)

    def _vertical_generator(self, x: torch.Tensor, u: torch.Tensor, grams: Grams) -> torch.Tensor:
        r"""The :math:`W \in \mathfrak{h}` with ``u - vertical(x, W)`` horizontal: ``M c = b``,
        :math:`b_i = \langle C_A P - Q C_B^\top, E_i \rangle_F`, :math:`W = \sum_i c_i E_i`."""
        if self.structure == "full":
            return super()._vertical_generator(x, u, grams)
        at_ua, bt_ub = self.cross(x, u)
        p, q = grams.p, grams.q
        if self.group_dimension == 0:
            return torch.zeros_like(at_ua)
        rhs = at_ua @ p - q @ bt_ub.transpose(-1, -2)
        if self.structure == "orthogonal":
            return self._orthogonal_generator(rhs, grams)
        e = self._basis(p)
        b = torch.einsum("rkl,...kl->...r", e, rhs)
        mat = self._vertical_gram(grams)
        eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
        mat = torch.where(grams.ok[..., None, None], mat, eye)  # bad heads: no NaN (check=False)
        c = torch.linalg.solve_ex(mat, b[..., None]).result[..., 0]
        return torch.einsum("...r,rkl->...kl", c, e)

    @staticmethod
    def _orthogonal_generator(rhs: torch.Tensor, grams: Grams) -> torch.Tensor:
        r"""Closed form for :math:`\mathfrak{h} = \mathfrak{o}(k)`: the skew :math:`\Omega` with
        :math:`\langle E, R - 2 Q \Omega P \rangle_F = 0` for every skew :math:`E`, i.e. the
        generalized Lyapunov equation :math:`Q \Omega P + P \Omega Q = \mathrm{skew}(R)`
        (:math:`2\,\mathrm{skew}(Q \Omega P)` for skew :math:`\Omega`),
        :math:`R = C_A P - Q C_B^\top`, :math:`\mathrm{skew}(R) = (R - R^\top)/2`.

        Simultaneous diagonalization of the pencil: with :math:`Q = L L^\top` and the eigenpairs
        :math:`L^{-1} P L^{-\top} = U D U^\top`, :math:`V = L^{-\top} U` has
        :math:`V^\top Q V = I`, :math:`V^\top P V = D`, and :math:`\Omega = V Y V^\top` with
        :math:`Y_{ij} = (V^\top \mathrm{skew}(R) V)_{ij} / (d_i + d_j)`.
        """
        chol = grams.chol_q
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        half = torch.linalg.solve_triangular(chol, grams.p, upper=False)  # L^{-1} P
        c = torch.linalg.solve_triangular(chol, half.mT, upper=False)  # L^{-1} P L^{-T}
        c = torch.where(grams.ok[..., None, None], 0.5 * (c + c.mT), eye)
        d, vecs = torch.linalg.eigh(c)
        v = torch.linalg.solve_triangular(chol.mT, vecs, upper=True)  # L^{-T} U
        skew_r = 0.5 * (rhs - rhs.mT)
        y = (v.mT @ skew_r @ v) / (d[..., :, None] + d[..., None, :])
        return v @ y @ v.mT


def _scaling_blocks(gens: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    r"""Indicators ``(nb, k)`` of disjoint blocks of head dimensions whose scalings lie in
    :math:`H`: the given generators that are diagonal 0/1 projectors with disjoint supports or,
    when there are none and the identity lies in the span, one block of all dimensions. Empty
    ``(0, k)`` otherwise."""
    k = gens.shape[-1]
    diagonals = gens.diagonal(dim1=-2, dim2=-1)
    off_diagonal = (gens - torch.diag_embed(diagonals)).abs().amax((-1, -2)) if len(gens) else gens
    picked: list[torch.Tensor] = []
    used = torch.zeros(k, dtype=torch.bool)
    for off, d in zip(off_diagonal, diagonals, strict=True):
        support = d != 0
        if float(off) == 0 and bool(((d == 0) | (d == 1)).all()) and support.any():
            if bool((used & support).any()):
                continue
            used |= support
            picked.append(d)
    if picked:
        return torch.stack(picked)
    if len(gens):
        eye = torch.eye(k, dtype=torch.float64).reshape(-1)
        flat = basis.reshape(len(basis), -1)
        residual = eye - flat.T @ (flat @ eye)
        if float(residual.norm()) <= 1e-10 * k:
            return torch.ones(1, k, dtype=torch.float64)
    return torch.zeros(0, k, dtype=torch.float64)


def _validate_generators(generators: object, check: bool, where: str) -> torch.Tensor:
    """Shape ``(r, k, k)``, real, finite, linearly independent (and, with ``check``, a Lie
    algebra); returned as a contiguous float64 CPU tensor."""
    if not isinstance(generators, torch.Tensor):
        try:
            generators = torch.as_tensor(generators)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{where}: generators must be a tensor of shape (r, k, k), got "
                f"{type(generators).__name__}; build one with rope_generators(k), "
                "orthogonal_generators(k) or full_generators(k)."
            ) from err
    if generators.is_complex() or generators.dtype == torch.bool:
        raise ValueError(
            f"{where}: generators must be real (float) matrices, got dtype {generators.dtype}; "
            "pass a real basis of the Lie algebra."
        )
    if (
        generators.dim() != 3
        or generators.shape[-1] != generators.shape[-2]
        or generators.shape[-1] < 1
    ):
        raise ValueError(
            f"{where}: generators must have shape (r, k, k) (a stack of r square k x k matrices, "
            f"k >= 1), got {tuple(generators.shape)}; stack the basis matrices along dim 0."
        )
    gens = generators.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if not bool(torch.isfinite(gens).all()):
        raise ValueError(f"{where}: generators hold NaN or Inf; pass a finite basis.")
    r, k = gens.shape[0], gens.shape[-1]
    if r == 0:
        return gens
    if r > k * k:
        raise ValueError(
            f"{where}: {r} generators cannot be linearly independent in the {k * k}-dimensional "
            f"space of {k} x {k} matrices; pass a basis of the Lie algebra (at most k^2 elements)."
        )
    flat = gens.reshape(r, -1)
    sv = torch.linalg.svdvals(flat)
    tol = max(r, k * k) * torch.finfo(torch.float64).eps * 1e3 * float(sv[0])
    if float(sv[-1]) <= tol:
        rank = int((sv > tol).sum())
        raise ValueError(
            f"{where}: the {r} generators are linearly dependent (rank {rank}); pass a basis of "
            "the Lie algebra: drop the redundant generators (e.g. keep the columns of a "
            "rank-revealing QR of the flattened stack), or zero generators."
        )
    if check:
        basis = torch.linalg.qr(flat.T).Q  # (k^2, r), orthonormal columns
        gen = torch.Generator().manual_seed(0)
        coeffs = torch.randn(3, 2, r, generator=gen, dtype=torch.float64)
        x = torch.einsum("tr,rij->tij", coeffs[:, 0], gens)
        y = torch.einsum("tr,rij->tij", coeffs[:, 1], gens)
        bracket = (x @ y - y @ x).reshape(3, -1)
        residual = bracket - (bracket @ basis) @ basis.T
        scale = (x.reshape(3, -1).norm(dim=-1) * y.reshape(3, -1).norm(dim=-1)).clamp_min(1e-300)
        if bool((residual.norm(dim=-1) > 1e-8 * scale).any()):
            raise ValueError(
                f"{where}: the span of the generators is not closed under the commutator "
                "[X, Y] = XY - YX, so it is not the Lie algebra of a subgroup of GL(k); add the "
                "missing commutators to the basis (or pass check=False to skip this test)."
            )
    return gens
