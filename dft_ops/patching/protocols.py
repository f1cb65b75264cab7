"""Trainers' own ways of asking a model for its per-token loss, which a patch must answer or refuse.

Some trainers call the model with a keyword of their own and expect per-token
outputs back (TRL: ``model(**inputs, fused_lm_head=True)`` returning its
``FusedCausalLMOutput``), and install their own head to serve that call. A
patched model must never let such a call silently train another objective: a
patch set up for the protocol answers it with dft-ops' per-token loss, any
other patch refuses it with the fix. The knowledge of each trainer lives in
:mod:`dft_ops.integrations`, which registers a :class:`CallerProtocol` here.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class CallerProtocol:
    """One trainer's per-token call protocol. Subclasses live in ``dft_ops.integrations``."""

    name = "caller protocol"

    def __deepcopy__(self, memo):  # one registered instance: a deep-copied patched model serves the same protocol
        return self

    def claims(self, kwargs: dict) -> bool:
        """Whether a forward call with these keywords is this protocol's; removes its own keywords if so."""
        raise NotImplementedError

    def output(self, model_output, call) -> Any:
        """The protocol's output of a fused call (``call``: the :class:`FusedCall`, per-token mode)."""
        raise NotImplementedError

    def refusal(self) -> str:
        """What to do instead, for a patch that is not set up to answer this protocol."""
        raise NotImplementedError

    def wraps_forward(self, causal_lm: nn.Module) -> bool:
        """Whether the protocol's own head is installed as ``causal_lm``'s outermost ``forward``.

        Calls of the protocol then never reach the patched forward below it;
        the patch notices when the backbone runs outside its own forward.
        """
        return False


_REGISTERED: list[CallerProtocol] = []


def register(protocol: CallerProtocol) -> CallerProtocol:
    if protocol not in _REGISTERED:
        _REGISTERED.append(protocol)
    return protocol


def registered() -> tuple[CallerProtocol, ...]:
    return tuple(_REGISTERED)
