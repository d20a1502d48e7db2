"""Link impairments: the topology keys (delay, jitter, loss, rate) and the sender-side `LinkShaper`.

No test reads the real clock: `LinkShaper.departure` is given `now_ns` explicitly.
"""

from __future__ import annotations

import json
import textwrap

import msgpack
import numpy as np
import pytest

from emu.net.netem import LinkShaper
from emu.topology.file import validate_topology_text
from emu.topology.model import (
    Endpoint,
    LinkConfig,
    LinkImpairment,
    TopologyError,
    topology_from_dict,
)

MS = 1_000_000  # ns


def _topo(link_keys: str) -> str:
    """A valid topology whose second link (links[1], line 9) also has `link_keys` (a flow-mapping body)."""
    text = f"""
        name: t
        hosts:
          h1: {{cpus: 1, devices: {{eth0: {{ifindex: 1}}, eth1: {{ifindex: 2}}}}}}
        traffic:
          gen0: {{generate: {{}}}}
          sink0: {{}}
        links:
          - endpoints: [gen0, "h1:eth0"]
          - {{endpoints: ["h1:eth1", sink0], {link_keys}}}
        """
    return textwrap.dedent(text).lstrip("\n")


def _impair(link_keys: str) -> LinkImpairment:
    topo = validate_topology_text(_topo(link_keys), "n.yaml")
    assert topo.links[0].impair == LinkImpairment()
    return topo.links[1].impair


def _error(link_keys: str) -> str:
    with pytest.raises(TopologyError) as info:
        validate_topology_text(_topo(link_keys), "n.yaml")
    assert info.value.line == 9 and str(info.value).startswith("n.yaml:9: links[1]: "), str(info.value)
    return info.value.message


# --------------------------------------------------------------------------------------------------
# Parsing


def test_no_impairment_by_default() -> None:
    imp = _impair("rate: 1gbit")
    assert imp == LinkImpairment(rate_bps=10**9)
    topo = validate_topology_text(_topo("rate: 1gbit"), "n.yaml")
    assert topo.links[0].impair == LinkImpairment() and not topo.links[0].impair.active
    # Positional constructions made before the field existed still work.
    link = LinkConfig(Endpoint.parse("h1:eth0"), Endpoint.parse("gen0"), 7)
    assert link.line == 7 and link.impair == LinkImpairment()


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("0s", 0),
        ("0us", 0),
        ("200us", 200),
        ("200usec", 200),
        ("200usecs", 200),
        ("5ms", 5000),
        ("5msec", 5000),
        ("5msecs", 5000),
        ("1.5ms", 1500),
        ("1.1ms", 1100),
        (".5ms", 500),
        ("2.ms", 2000),
        ("1s", 1_000_000),
        ("1sec", 1_000_000),
        ("2secs", 2_000_000),
        ("0.000001s", 1),
        ("5MS", 5000),
        ("5 ms", 5000),
        ("10s", 10_000_000),
        ("10000ms", 10_000_000),
    ],
)
def test_duration_units(text: str, us: int) -> None:
    assert _impair(f"delay: {text}") == LinkImpairment(delay_us=us)
    assert _impair(f"jitter: '{text}'") == LinkImpairment(jitter_us=us)


@pytest.mark.parametrize(
    ("text", "probability"),
    [
        ("0%", 0.0),
        ("0.1%", 0.001),
        ("3%", 0.03),
        ("5%", 0.05),
        (".5%", 0.005),
        ("12.5%", 0.125),
        ("100%", 1.0),
        ("5 %", 0.05),
    ],
)
def test_loss_percent(text: str, probability: float) -> None:
    # Exact equality: the percentage is divided as a decimal, so 0.1% is the float 0.001, not 0.1 / 100.
    imp = _impair(f"loss: '{text}'")
    assert imp == LinkImpairment(loss=probability) and type(imp.loss) is float
    assert imp.active is (probability > 0)
    assert _impair(f"loss: {text}") == imp  # unquoted works too


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("64000bit", 64_000),
        ("500kbit", 500_000),
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("2.5gbit", 2_500_000_000),
        ("1tbit", 10**12),
        ("10tbit", 10 * 10**12),
        ("100Mbit", 100_000_000),
        ("1.5kbit", 1500),
        ("1bit", 1),
    ],
)
def test_rate_units(text: str, bps: int) -> None:
    assert _impair(f"rate: {text}") == LinkImpairment(rate_bps=bps)


def test_all_keys_together_and_jitter_above_delay() -> None:
    imp = _impair("delay: 1ms, jitter: 5ms, loss: 0.5%, rate: 100mbit")
    assert imp == LinkImpairment(delay_us=1000, jitter_us=5000, loss=0.005, rate_bps=100_000_000)
    assert imp.active


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        # durations
        ("delay: 5", "links[1]: delay '5' needs a unit: us, ms or s"),
        ("delay: '5'", "links[1]: delay '5' needs a unit: us, ms or s"),
        ("delay: 1.5", "links[1]: delay '1.5' needs a unit: us, ms or s"),
        ("delay: 0", "links[1]: delay '0' needs a unit: us, ms or s"),
        ("jitter: 5ns", "links[1]: jitter '5ns' has an unknown unit 'ns': use us, ms or s (or usec, msec, sec)"),
        ("delay: 5min", "delay '5min' has an unknown unit 'min'"),
        ("delay: -5ms", "links[1]: delay '-5ms' must not be negative"),
        ("delay: 0.5us", "links[1]: delay '0.5us' is not a whole number of microseconds"),
        ("delay: 10.000001s", "links[1]: delay '10.000001s' is more than the maximum of 10s"),
        ("jitter: 11s", "links[1]: jitter '11s' is more than the maximum of 10s"),
        ("delay: fast", "links[1]: delay 'fast' is not a duration such as 5ms, 200us or 1.5s"),
        ("delay: 1e3ms", "links[1]: delay '1e3ms' is not a duration such as 5ms, 200us or 1.5s"),
        ("delay: 5ms5", "links[1]: delay '5ms5' is not a duration such as 5ms, 200us or 1.5s"),
        ("delay: true", "links[1]: 'delay' must be a duration such as 5ms, 200us or 1.5s, not the boolean"),
        ("delay: null", "links[1]: 'delay' must be a duration such as 5ms, 200us or 1.5s, not null"),
        ("delay: [5ms]", "links[1]: 'delay' must be a duration such as 5ms, 200us or 1.5s, not a list"),
        # loss
        ("loss: 5", "links[1]: loss '5' needs a '%': write a percentage such as 0.1% or 5%"),
        ("loss: 0.01", "links[1]: loss '0.01' needs a '%': write a percentage such as 0.1% or 5%"),
        ("loss: 101%", "links[1]: loss '101%' must be between 0% and 100%"),
        ("loss: 100.5%", "links[1]: loss '100.5%' must be between 0% and 100%"),
        ("loss: -1%", "links[1]: loss '-1%' must not be negative"),
        ("loss: 5pct", "links[1]: loss '5pct' is not a percentage such as 0.1% or 5%"),
        ("loss: lots", "links[1]: loss 'lots' is not a percentage such as 0.1% or 5%"),
        ("loss: {a: 1}", "links[1]: 'loss' must be a percentage such as 0.1% or 5%, not a mapping"),
        # rate
        ("rate: 100", "links[1]: rate '100' needs a unit: bit, kbit, mbit, gbit or tbit"),
        ("rate: 1000000.0", "links[1]: rate '1000000.0' needs a unit: bit, kbit, mbit, gbit or tbit"),
        (
            "rate: 100mbps",
            "links[1]: rate '100mbps' is in bytes per second ('mbps' means BYTES/s in tc); "
            "write the rate in bits: '800mbit' (units: bit, kbit, mbit, gbit or tbit)",
        ),
        ("rate: 12.5MBps", "write the rate in bits: '100mbit'"),
        ("rate: 1bps", "write the rate in bits: '8bit'"),
        ("rate: 2kbps", "write the rate in bits: '16kbit'"),
        ("rate: 1gbps", "write the rate in bits: '8gbit'"),
        ("rate: 1tbps", "write the rate in bits: '8tbit'"),
        ("rate: 100mibit", "rate '100mibit' has an unknown unit 'mibit': use bit, kbit, mbit, gbit or tbit"),
        ("rate: 100mbit/s", "has an unknown unit 'mbit/s'"),
        ("rate: 0bit", "links[1]: rate '0bit' must be more than 0 (leave 'rate' out for an unlimited link)"),
        ("rate: 0.5bit", "links[1]: rate '0.5bit' is not a whole number of bits per second"),
        ("rate: 11tbit", "links[1]: rate '11tbit' is more than the maximum of 10tbit"),
        ("rate: -1mbit", "links[1]: rate '-1mbit' must not be negative"),
        ("rate: yes", "links[1]: 'rate' must be a bit rate such as 100mbit, 1gbit or 64000bit, not the boolean"),
        # unknown keys keep their did-you-mean
        (
            "dealy: 5ms",
            "links[1]: unknown key 'dealy' (expected one of: endpoints, delay, jitter, loss, rate); "
            "did you mean 'delay'?",
        ),
    ],
)
def test_bad_values(keys: str, fragment: str) -> None:
    assert fragment in _error(keys)


def test_duplicate_impairment_key() -> None:
    with pytest.raises(TopologyError, match=r"^n\.yaml:9: duplicate key 'delay'"):
        validate_topology_text(_topo("delay: 1ms, delay: 2ms"), "n.yaml")


def test_round_trip_json_and_msgpack() -> None:
    topo = validate_topology_text(_topo("delay: 1.5ms, jitter: 200us, loss: 0.1%, rate: 100mbit"), "n.yaml")
    d = topo.to_dict()
    assert d["links"][1]["impair"] == {"delay_us": 1500, "jitter_us": 200, "loss": 0.001, "rate_bps": 100_000_000}
    assert d["links"][0]["impair"] == {"delay_us": 0, "jitter_us": 0, "loss": 0.0, "rate_bps": 0}
    for back in (json.loads(json.dumps(d)), msgpack.unpackb(msgpack.packb(d))):
        again = topology_from_dict(back)
        assert again == topo
        assert type(again.links[1].impair.loss) is float and type(again.links[1].impair.rate_bps) is int
    # Only plain msgpack types: packing must not need a default= hook.
    msgpack.packb(d, default=None, strict_types=True)


def test_from_dict_without_impair_key() -> None:
    """A dict from before impairments existed (or from an older peer) means unimpaired links."""
    topo = validate_topology_text(_topo("delay: 1ms"), "n.yaml")
    d = topo.to_dict()
    for ld in d["links"]:
        del ld["impair"]
    old = topology_from_dict(d)
    assert [link.impair for link in old.links] == [LinkImpairment(), LinkImpairment()]
    assert [link.line for link in old.links] == [link.line for link in topo.links] == [8, 9]


def test_link_of() -> None:
    topo = validate_topology_text(_topo("loss: 1%"), "n.yaml")
    link = topo.link_of(Endpoint.parse("sink0"))
    assert link is not None and link.impair.loss == 0.01 and link is topo.links[1]
    assert topo.link_of("h1:eth1") is link
    assert topo.link_of("gen0") is topo.links[0]
    assert topo.link_of("h1:eth9") is None and topo.link_of(Endpoint("traffic", None, "nope")) is None


def test_impairment_active() -> None:
    assert not LinkImpairment().active
    for imp in (
        LinkImpairment(delay_us=1),
        LinkImpairment(jitter_us=1),
        LinkImpairment(loss=1e-9),
        LinkImpairment(rate_bps=1),
    ):
        assert imp.active


# --------------------------------------------------------------------------------------------------
# The shaper


def test_zero_impairment_is_inactive_and_free() -> None:
    sh = LinkShaper(LinkImpairment(), seed=1)
    assert sh.active is False
    assert sh.lose(64) is None
    for now in (0, 5, 5, 1_000_000_000_000):
        assert sh.departure(1500 * 64, now) == now


def test_lose_none_without_loss_even_when_active() -> None:
    sh = LinkShaper(LinkImpairment(delay_us=10), seed=1)
    assert sh.active and sh.lose(64) is None


def test_loss_fraction() -> None:
    sh = LinkShaper(LinkImpairment(loss=0.05), seed=1234)
    masks = [sh.lose(64) for _ in range(1000)]
    assert all(m is not None and m.dtype == np.bool_ and m.shape == (64,) for m in masks)
    lost = sum(int(m.sum()) for m in masks if m is not None)
    # 64000 Bernoulli(0.05) draws: mean 3200, sd ~55; +-10 sd is a bound no seed will break by luck.
    assert 2650 < lost < 3750


def test_loss_extremes() -> None:
    all_lost = LinkShaper(LinkImpairment(loss=1.0), seed=0).lose(100)
    assert all_lost is not None and bool(all_lost.all())
    empty = LinkShaper(LinkImpairment(loss=0.5), seed=0).lose(0)
    assert empty is not None and empty.shape == (0,)


def test_loss_is_reproducible_with_a_seed() -> None:
    a = LinkShaper(LinkImpairment(loss=0.3), seed=7)
    b = LinkShaper(LinkImpairment(loss=0.3), seed=7)
    for _ in range(20):
        ma, mb = a.lose(64), b.lose(64)
        assert ma is not None and mb is not None and np.array_equal(ma, mb)


def test_rate_serialises_back_to_back_messages() -> None:
    # 1250 bytes = 10000 bits = 10 ms at 1 Mbit/s; all ten are handed over at once.
    sh = LinkShaper(LinkImpairment(rate_bps=1_000_000), seed=0)
    t0 = 1_000 * MS
    deps = [sh.departure(1250, t0) for _ in range(10)]
    assert deps == [t0 + (i + 1) * 10 * MS for i in range(10)]


def test_rate_idle_link_has_no_burst_credit() -> None:
    sh = LinkShaper(LinkImpairment(rate_bps=1_000_000), seed=0)
    assert sh.departure(1250, 0) == 10 * MS
    # Long idle: the next message still takes its full serialisation time (no accumulated tokens).
    assert sh.departure(1250, 1000 * MS) == 1010 * MS
    # Sent while the link is still busy: it waits for the previous one.
    assert sh.departure(1250, 1005 * MS) == 1020 * MS


def test_rate_rounds_serialisation_up() -> None:
    sh = LinkShaper(LinkImpairment(rate_bps=3), seed=0)
    assert sh.departure(1, 0) == -(-8 * 10**9 // 3)  # 8 bits at 3 bit/s, rounded up to the next ns


def test_delay_adds_exactly_delay() -> None:
    sh = LinkShaper(LinkImpairment(delay_us=5000), seed=0)
    assert sh.active and sh.lose(10) is None
    for now in (0, 1, 10 * MS, 10 * MS, 11 * MS + 3):
        assert sh.departure(1500, now) == now + 5 * MS


def test_delay_after_serialisation() -> None:
    sh = LinkShaper(LinkImpairment(delay_us=2000, rate_bps=1_000_000), seed=0)
    assert [sh.departure(1250, 0) for _ in range(3)] == [12 * MS, 22 * MS, 32 * MS]


def test_jitter_bounds_and_no_reordering() -> None:
    delay, jitter = 1000 * 1000, 800 * 1000  # ns
    sh = LinkShaper(LinkImpairment(delay_us=1000, jitter_us=800), seed=99)
    now = prev = clamped = 0
    for _ in range(5000):
        now += 50_000  # 50 us apart, much closer than the jitter: fresh samples would overtake each other
        dep = sh.departure(1500, now)
        assert dep >= prev, "messages must never be reordered"
        assert now + delay - jitter <= dep
        # Upper bound: a fresh sample, or the previous departure it was held back to.
        assert dep <= max(now + delay + jitter, prev)
        clamped += dep == prev
        prev = dep
    assert clamped > 1000  # the FIFO rule did hold many of them back


def test_jitter_samples_are_uniform_over_the_range() -> None:
    delay, jitter = 1000 * 1000, 800 * 1000  # ns
    sh = LinkShaper(LinkImpairment(delay_us=1000, jitter_us=800), seed=42)
    offsets = []
    for i in range(4000):
        now = i * 10 * MS  # far apart: FIFO never interferes, each offset is delay + one sample
        offsets.append(sh.departure(1500, now) - now)
    arr = np.array(offsets) - delay
    assert arr.min() >= -jitter and arr.max() <= jitter
    # Uniform on [-j, j]: each quarter holds ~1000 of 4000 (sd ~27); the mean is ~0 (sd ~7300 ns).
    counts, _ = np.histogram(arr, bins=4, range=(-jitter, jitter))
    assert all(800 < c < 1200 for c in counts), counts
    assert abs(arr.mean()) < 60_000


def test_jitter_larger_than_delay_clamps_at_zero() -> None:
    sh = LinkShaper(LinkImpairment(delay_us=100, jitter_us=1000), seed=3)
    now = 0
    prev = 0
    at_zero = 0
    for _ in range(2000):
        now += 10 * MS  # far apart: FIFO never interferes
        dep = sh.departure(64, now)
        assert now <= dep <= now + 1100 * 1000 and dep >= prev
        at_zero += dep == now
        prev = dep
    # P(sample <= -100us) = 900/2001: about 900 of 2000 leave with no delay at all.
    assert 700 < at_zero < 1100


def test_jitter_only_never_before_now() -> None:
    sh = LinkShaper(LinkImpairment(jitter_us=10), seed=5)
    assert sh.active
    for i in range(100):
        now = i * MS
        assert now <= sh.departure(64, now) <= now + 10_000


def test_departure_never_goes_back_when_now_does() -> None:
    sh = LinkShaper(LinkImpairment(delay_us=10), seed=0)
    first = sh.departure(64, 100 * MS)
    assert sh.departure(64, 50 * MS) == first  # a clock that went backwards still leaves FIFO order


def test_settle_stall_covers_the_longest_time_a_frame_stays_on_a_link() -> None:
    """The coordinator waits for traffic to settle at least as long as a frame can stay on any link: delay
    plus jitter, plus one message's serialisation at the link's rate."""
    from emu.net.link import LINK_BYTES
    from emu.run.coordinator import DRAIN_STALL, settle_stall

    assert settle_stall(validate_topology_text(_topo("loss: 1%"), "n.yaml")) == DRAIN_STALL
    topo = validate_topology_text(_topo("delay: 10s, jitter: 10s"), "n.yaml")
    assert settle_stall(topo) == DRAIN_STALL + 20
    topo = validate_topology_text(_topo("delay: 5ms, rate: 1mbit"), "n.yaml")
    assert settle_stall(topo) == pytest.approx(DRAIN_STALL + 0.005 + LINK_BYTES * 8 / 1e6)
