"""Link impairments: what tc-netem would do to frames on an emulated link, applied by the link's sender.

Real links lose frames, take time to cross and have a finite bit rate; testing forwarding against a
perfect wire hides what happens when they do (TX completions that outrun delivery, receivers that see
bursts, accounting that must explain every missing frame).  On Linux one would put ``tc qdisc add ...
netem delay 5ms 1ms loss 0.1% rate 100mbit`` on both ends of a veth pair; that needs privileges and
real interfaces, so here the emulated link does it itself: a topology's link item declares the
impairment (`emu.topology.LinkImpairment`), and each end's sender runs one `LinkShaper` over what *it*
sends, as netem on both veth ends would.

The sender hands the shaper whole messages (up to a NAPI budget of already-batched frames), never
single packets, so the work is per message: one random draw for the loss mask, one for the jitter.

- `LinkShaper.lose` says which frames of a message are lost on the wire (independent Bernoulli draws,
  netem's ``loss random``).  The caller drops them and counts them (``link_lost``).
- `LinkShaper.departure` says when a message has left the link: serialisation at ``rate`` (the link
  is busy until the previous message is serialised: a token bucket with no burst), then ``delay`` plus
  a jitter sample, uniform in [-jitter, +jitter] (netem's default, table-less distribution), clamped so
  that the added delay is never negative.

Messages are never reordered: a departure is never earlier than the previous one.  netem reorders
with jitter unless a rate is set; here the frames of a batch are one message and the emulator's links
are FIFO, so a message whose jitter sample would overtake its predecessor leaves right after it.
Times are ``time.monotonic_ns()`` values passed in by the caller, which keeps the shaper a pure
function of its inputs and its seed (tests never touch the real clock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the shaper only reads an impairment's fields: transport does not import the topology
    from emu.topology.model import LinkImpairment

__all__ = ["LinkShaper"]

_NS_PER_S = 1_000_000_000


class LinkShaper:
    """One sending end of an impaired link; see the module docstring for the model."""

    __slots__ = (
        "_busy_until",
        "_jitter_ns",
        "_last_departure",
        "_rng",
        "active",
        "delay_ns",
        "imp",
        "loss",
        "rate_bps",
    )

    def __init__(self, imp: LinkImpairment, seed: int | None = None) -> None:
        self.imp = imp
        self.active: bool = imp.active  # False: the caller can skip the shaper entirely
        self.delay_ns = imp.delay_us * 1000
        self._jitter_ns = imp.jitter_us * 1000
        self.loss = float(imp.loss)
        self.rate_bps = imp.rate_bps
        self._rng = np.random.default_rng(seed)
        self._busy_until = 0  # when the link has finished serialising the last message
        self._last_departure = 0  # FIFO: no message leaves before its predecessor

    def lose(self, n: int) -> np.ndarray | None:
        """A bool mask of `n` frames, True = lost on the wire; None when the link loses nothing."""
        if self.loss == 0.0:
            return None
        return self._rng.random(n) < self.loss

    def departure(self, nbytes: int, now_ns: int) -> int:
        """The monotonic_ns at which a message of `nbytes`, sent at `now_ns`, has left the link."""
        sent = now_ns
        if self.rate_bps:
            # Serialisation starts when the link is free; ceil so a message never takes 0 ns.
            start = max(now_ns, self._busy_until)
            sent = start + -(-nbytes * 8 * _NS_PER_S // self.rate_bps)
            self._busy_until = sent
        delay = self.delay_ns
        if self._jitter_ns:
            delay += int(self._rng.integers(-self._jitter_ns, self._jitter_ns, endpoint=True))
            if delay < 0:
                delay = 0
        out = sent + delay
        if out < self._last_departure:
            out = self._last_departure
        self._last_departure = out
        return out
