"""The GAPT state machine driven through scripted CE / MBE sequences: every transition and counter."""

import math

from gapt_versions import ProjectGate as GAPT


def machine(**kw):
    return GAPT(**{"delta": 0.01, "tau": 0.1, "patience_memorize": 3, "patience_compress": 2, **kw})


def to_compression(g, ce=9.0):
    """Drive a fresh machine into phase 2: one improving step, then patience_memorize flat steps."""
    g.step(ce)
    for _ in range(g.patience_memorize):
        g.step(ce)
    assert g.phase == 2


def test_initial_state():
    g = GAPT()
    assert (g.phase, g.s_m, g.s_c, g.ce_min, g.mbe_min) == (1, 0, 0, math.inf, None)
    assert (g.delta, g.tau, g.patience_memorize, g.patience_compress) == (0.01, 0.1, 125, 75)


def test_memorization_counts_steps_without_relative_ce_progress():
    g = machine()
    assert g.step(10.0) == 1 and g.s_m == 0 and g.ce_min == 10.0  # anything improves on +inf
    assert g.step(9.95) == 1 and g.s_m == 1 and g.ce_min == 9.95  # a 0.5% drop is not progress, but is the new min
    assert g.step(9.9) == 1 and g.s_m == 2  # 9.9 > 9.95 * 0.99
    assert g.step(9.0) == 1 and g.s_m == 0  # real progress resets the counter
    assert g.step(9.0) == 1 and g.s_m == 1
    assert g.step(9.5) == 1 and g.s_m == 2 and g.ce_min == 9.0  # a worse CE does not raise the minimum
    assert g.step(9.0, None) == 2  # patience reached: compression
    assert g.s_c == 0 and g.mbe_min is None and g.switches == 1


def test_compression_counts_steps_without_mbe_progress_in_any_layer():
    g = machine()
    to_compression(g)
    assert g.step(9.0, [5.0, 5.0]) == 2 and g.s_c == 0 and g.mbe_min == [5.0, 5.0]  # first values improve on +inf
    assert g.step(9.5, [5.0, 5.0]) == 2 and g.s_c == 1  # 9.5 <= 9.0 * 1.1: no spike; no MBE progress
    assert g.step(9.0, [5.1, 4.9]) == 2 and g.s_c == 0  # layer 2 improved by 2%: progress
    assert g.mbe_min == [5.0, 4.9]  # per-layer minima
    assert g.step(8.5, [5.0, 4.89]) == 2 and g.s_c == 1 and g.ce_min == 8.5  # CE minimum tracked in phase 2 too
    assert g.step(8.6, [5.0, 4.9]) == 1  # patience_compress reached: back to memorization
    assert g.s_m == 0 and g.switches == 2


def test_ce_spike_ends_compression_immediately():
    g = machine()
    to_compression(g)
    g.step(9.0, [5.0])
    assert g.step(9.9, [4.0]) == 2  # exactly ce_min * (1 + tau) is not a spike
    assert g.step(9.91, [3.0]) == 1  # above it is
    assert g.s_m == 0 and g.mbe_min == [4.0]  # the spike step's MBE is not recorded


def test_mbe_minima_reset_on_each_compression_phase():
    g = machine()
    to_compression(g)
    g.step(9.0, [1.0])
    g.step(9.0, [1.0])
    g.step(9.0, [1.0])
    assert g.phase == 1
    for _ in range(3):
        g.step(9.0)
    assert g.phase == 2 and g.mbe_min is None
    g.step(9.0, [3.0])  # higher than the old minimum 1.0, but the minimum was reset: progress
    assert g.s_c == 0 and g.mbe_min == [3.0]


def test_scalar_mbe_is_accepted():
    g = machine()
    to_compression(g)
    g.step(9.0, 2.0)
    assert g.mbe_min == [2.0]


def test_state_dict_round_trip_continues_identically():
    script = [(10.0, None), (10.0, None), (10.0, None), (10.0, None), (10.0, [3.0, 2.0]), (10.2, [2.9, 2.0]),
              (10.1, [2.95, 2.1]), (10.0, [2.95, 2.1]), (9.0, None), (9.0, None)]
    a = machine()
    for ce, m in script[:5]:
        a.step(ce, m)
    b = machine()
    b.load_state_dict(a.state_dict())
    assert [a.step(ce, m) for ce, m in script[5:]] == [b.step(ce, m) for ce, m in script[5:]]
    assert a.state_dict() == b.state_dict()


def test_relative_threshold_never_ends_compression_near_zero_but_absolute_does():
    mbe_values = [0.010 * 0.98 ** k for k in range(50)]  # 2% "progress" per step from noise near 0
    relative = machine()
    to_compression(relative)
    assert all(relative.step(9.0, [m]) == 2 for m in mbe_values)  # the phase never ends
    absolute = machine(delta_mbe_abs=0.01)
    to_compression(absolute)
    phases = [absolute.step(9.0, [m]) for m in mbe_values]
    assert phases[:2] == [2, 2] and phases[2] == 1  # first value improves on +inf, then 2 flat steps end it


def test_absolute_threshold_still_sees_real_progress():
    g = machine(delta_mbe_abs=0.01)
    to_compression(g)
    for m in (1.0, 0.98, 0.96, 0.94):  # drops of 0.02 > 0.01
        assert g.step(9.0, [m]) == 2 and g.s_c == 0


def test_every_switch_says_why_with_the_values_compared():
    g = machine()
    g.step(9.0)
    assert g.last_switch is None
    for _ in range(3):
        g.step(9.0)
    assert g.phase == 2 and g.last_switch == {"reason": "ce_plateau", "ce": 9.0, "ce_min": 9.0,
                                              "steps_without_progress": 3}
    g.step(9.0, [5.0])
    assert g.last_switch is None  # only the step that switched carries a reason
    g.step(10.0, [4.0])
    assert g.phase == 1 and g.last_switch["reason"] == "ce_spike"
    assert (g.last_switch["ce"], g.last_switch["ce_min"]) == (10.0, 9.0)
    assert g.last_switch["ce_limit"] == 9.0 * 1.1
    for _ in range(3):
        g.step(9.0)
    assert g.phase == 2 and g.last_switch["reason"] == "ce_plateau"
    for mbe in (5.0, 5.0, 5.0):
        g.step(9.0, [mbe])
    assert g.phase == 1 and g.last_switch["reason"] == "mbe_patience"
    assert g.last_switch["mbe"] == [5.0] and g.last_switch["mbe_min"] == [5.0]
    assert g.last_switch["steps_without_progress"] == 2


def test_running_mean_smooths_what_the_rules_see():
    raw, smooth = machine(), machine(ema=0.9)
    to_compression(raw)
    to_compression(smooth)
    for g in (raw, smooth):
        g.step(9.0, [5.0])
    assert raw.step(10.0, [5.0]) == 1  # one noisy step is a spike for the paper's rule
    assert smooth.step(10.0, [5.0]) == 2 and smooth.ce_avg == 0.9 * 9.0 + 0.1 * 10.0  # its mean is not
    assert smooth.mbe_avg == [5.0]
    smooth.step(9.0, [3.0])
    assert smooth.mbe_avg == [0.9 * 5.0 + 0.1 * 3.0]
    s = smooth.state_dict()
    twin = machine(ema=0.9)
    twin.load_state_dict(s)
    assert [twin.step(8.0, [2.0]), twin.ce_avg, twin.mbe_avg] == [smooth.step(8.0, [2.0]), smooth.ce_avg,
                                                                   smooth.mbe_avg]


def test_running_mean_of_mbe_restarts_with_each_compression_phase():
    g = machine(ema=0.5)
    to_compression(g)
    g.step(9.0, [4.0])
    g.step(20.0, [4.0])  # its running mean, 14.5, is a spike
    assert g.phase == 1 and g.last_switch["reason"] == "ce_spike"
    while g.phase == 1:
        g.step(8.0)
    g.step(8.0, [1.0])
    assert g.mbe_avg == [1.0]  # not averaged with the 4.0 of the phase before


def test_state_dict_holds_every_field_but_the_settings_whatever_is_added():
    """Exact resume needs the whole state: state_dict takes every attribute that is not a keyword argument of
    __init__, so a field a student adds to the state machine is saved without touching state_dict, and a resumed
    machine keeps the settings it was built with (a new patience given on resume is not overwritten)."""
    import inspect
    g = machine()
    to_compression(g)
    g.step(8.0, [1.0, 2.0])
    g.new_counter = 5  # e.g. a rule added in a fork
    state = g.state_dict()
    settings = set(inspect.signature(GAPT.__init__).parameters) - {"self"}
    assert state["new_counter"] == 5 and settings <= set(vars(g))  # every setting stored under its own name
    assert set(state) == set(vars(g)) - settings - {"last_switch"}
    fresh = machine(patience_compress=9)
    fresh.load_state_dict(state)
    assert fresh.patience_compress == 9
    assert {k: v for k, v in vars(fresh).items() if k not in settings | {"last_switch"}} == state


def test_gapt_takes_keyword_arguments_only():
    import pytest
    with pytest.raises(TypeError):
        GAPT(0.01, 0.1)
    assert GAPT(tau=0.2).tau == 0.2
