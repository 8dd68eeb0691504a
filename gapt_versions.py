"""
The GAPT gates other than the default. train.py holds the default, the rules of the author's training code of the
paper's time (`gapt_version="paper_era"`); this file holds the author's two other versions and this project's own
earlier rules, each selectable by `gapt_version` (or a preset: config/gapt_<version>.py). docs/gapt_versions.md says
where each rule was read in the author's code and where this code departs from it.

    algorithm1  fangyuan-ksgk/minimind src/sorl.py, GatedPhaseTransition (the paper's Algorithm 1 notation)
    later       fangyuan-ksgk/mod_gpt src/gapt.py + train_iblm.py + run_iblm.sh (the author's later code)
    project     this project's rules until 2026-12-01 (every result in docs/ measured before that date)

Every gate has the same face: `phase` (1 memorization, 2 compression), `switches`, `last_switch` (after a step that
switched: why, one of SWITCH_REASONS, and the values the rule compared), state_dict / load_state_dict, and
step(ce, mbe) -> the phase for what follows. What a step is fed, and when, is each version's `feeds` (train.py).
"""

import math

SWITCH_REASONS = ("ce_plateau", "ce_spike", "mbe_patience")  # why a phase ends; experiment.py's tables use these
GAPT_VERSIONS = {  # the first line of every run names its version
    "paper_era": "the author's training code of the paper's time (mod_gpt train_pcgrad.py + RRScheduler)",
    "algorithm1": "the author's class in the notation of the paper's Algorithm 1 (minimind src/sorl.py)",
    "later": "the author's later code (mod_gpt src/gapt.py + train_iblm.py + run_iblm.sh)",
    "project": "this project's own rules until 2026-12-01"}


def _switch(gate, phase, reason, **values):  # every version: record why, change phase, count
    gate.last_switch = {"reason": reason, **values}
    gate.phase = phase
    gate.switches += 1


def gate_state_dict(gate):  # the state: every attribute but the settings (which come from the config)
    return {k: v for k, v in vars(gate).items() if k not in gate.settings and k != "last_switch"}


def load_gate_state(gate, state):
    for k, v in state.items():
        setattr(gate, k, v)


class Algorithm1Gate:
    """minimind's GatedPhaseTransition.step(ssl_loss, abs_loss), with the mean MBE of the regularised layers as the
    auxiliary loss (minimind gates another auxiliary loss; the MBE analogue is this project's choice). Fed once per
    optimizer step with the step's mean CE and mean MBE (feeds = "step").

    Absolute δ for CE and MBE alike; E_min updated on every step, before the spike test; entering compression resets
    E_min and the MBE minimum to +inf; the MBE minimum is updated in compression only, not on a spike step."""
    settings = ("delta", "tau", "patience_memorize", "patience_compress")
    feeds = "step"
    _enter, state_dict, load_state_dict = _switch, gate_state_dict, load_gate_state

    def __init__(self, *, delta=0.01, tau=0.1, patience_memorize=10, patience_compress=10):
        self.delta, self.tau, self.patience_memorize, self.patience_compress = delta, tau, patience_memorize, \
            patience_compress
        self.phase, self.s_m, self.s_c, self.switches, self.last_switch = 1, 0, 0, 0, None
        self.ce_min, self.mbe_min = math.inf, math.inf

    def step(self, ce, mbe):
        self.last_switch = None
        gain = self.ce_min - ce  # +inf on the first step: progress
        self.ce_min = min(self.ce_min, ce)
        if self.phase == 1:
            self.s_m = 0 if gain > self.delta else self.s_m + 1
            if self.s_m >= self.patience_memorize:
                self._enter(2, "ce_plateau", ce=ce, ce_min=self.ce_min, steps_without_progress=self.s_m)
                self.s_c, self.ce_min, self.mbe_min = 0, math.inf, math.inf
        elif ce > self.ce_min * (1 + self.tau):  # ce_min already includes this step
            self._enter(1, "ce_spike", ce=ce, ce_min=self.ce_min, ce_limit=self.ce_min * (1 + self.tau))
            self.s_m = 0
        else:
            drop = self.mbe_min - mbe
            self.mbe_min = min(self.mbe_min, mbe)
            self.s_c = 0 if drop > self.delta else self.s_c + 1
            if self.s_c >= self.patience_compress:
                self._enter(1, "mbe_patience", mbe=mbe, mbe_min=self.mbe_min, steps_without_progress=self.s_c)
                self.s_m = 0
        return self.phase


class LaterGate:
    """mod_gpt src/gapt.py GatedPhaseTransition as train_iblm.py drives it: fed once per micro-batch (feeds =
    "micro") with that micro-batch's CE and its compression term w · mean MBE of the regularised layers.

    Relative gains (min − x) / max(|min|, 1e-6), 0 while min is +inf (so the first call is no progress); both
    minima global, updated on every call in both phases, never reset; a CE above the minimum before this call
    times (1 + τ) ends compression; each counter counts in its own phase and restarts at the switch it causes."""
    settings = ("delta", "delta_mbe", "tau", "patience_memorize", "patience_compress")
    feeds = "micro"
    _enter, state_dict, load_state_dict = _switch, gate_state_dict, load_gate_state

    def __init__(self, *, delta=0.01, delta_mbe=0.01, tau=0.1, patience_memorize=125, patience_compress=75):
        self.delta, self.delta_mbe, self.tau = delta, delta_mbe, tau
        self.patience_memorize, self.patience_compress = patience_memorize, patience_compress
        self.phase, self.s_m, self.s_c, self.switches, self.last_switch = 1, 0, 0, 0, None
        self.ce_min, self.mbe_min = math.inf, math.inf

    @staticmethod
    def _gain(x, best):
        return 0.0 if math.isinf(best) or abs(best) < 1e-9 else (best - x) / max(abs(best), 1e-6)

    def step(self, ce, mbe):
        self.last_switch = None
        gain_ce, gain_mbe = self._gain(ce, self.ce_min), self._gain(mbe, self.mbe_min)
        ce_min_before = self.ce_min
        self.ce_min, self.mbe_min = min(self.ce_min, ce), min(self.mbe_min, mbe)
        if self.phase == 1:
            self.s_m = 0 if gain_ce > self.delta else self.s_m + 1
            if self.s_m >= self.patience_memorize:
                self._enter(2, "ce_plateau", ce=ce, ce_min=self.ce_min, steps_without_progress=self.s_m)
                self.s_m = 0
        elif gain_ce < -self.tau:
            self._enter(1, "ce_spike", ce=ce, ce_min=ce_min_before, ce_limit=ce_min_before * (1 + self.tau))
            self.s_c = 0
        else:
            self.s_c = 0 if gain_mbe > self.delta_mbe else self.s_c + 1
            if self.s_c >= self.patience_compress:
                self._enter(1, "mbe_patience", mbe=mbe, mbe_min=self.mbe_min, steps_without_progress=self.s_c)
                self.s_c = 0
        return self.phase


class ProjectGate:
    """This project's rules until 2026-12-01, fed once per optimizer step with the step's mean CE and per-layer MBE
    (feeds = "step"; the MBE is ignored in phase 1). "x improved on best" means best is +inf or
    x < best·(1 − delta); with delta_mbe_abs > 0, an MBE improves only if it drops by more than that absolute
    amount. Phase 1 → 2 after patience_memorize steps without CE progress (ce_plateau), with fresh per-layer MBE
    minima; in phase 2 a CE above the run's best CE · (1 + tau) ends compression at once (ce_spike), and
    patience_compress steps in which no layer's MBE improved on its own minimum end it too (mbe_patience).

    ema > 0: the rules see exponential moving averages (weight 1 − ema on the new value) of CE and of each layer's
    MBE instead of the raw step values, so that batch noise in a small step's CE can neither fake progress nor a
    spike. The MBE average restarts with each compression phase."""
    settings = ("delta", "tau", "patience_memorize", "patience_compress", "delta_mbe_abs", "ema")
    feeds = "step"
    state_dict, load_state_dict = gate_state_dict, load_gate_state

    def __init__(self, *, delta=0.01, tau=0.1, patience_memorize=125, patience_compress=75, delta_mbe_abs=0.0,
                 ema=0.0):
        self.delta, self.tau, self.delta_mbe_abs, self.ema = delta, tau, delta_mbe_abs, ema
        self.patience_memorize, self.patience_compress = patience_memorize, patience_compress
        self.phase = 1
        self.ce_min = math.inf
        self.mbe_min = None  # per-layer minima, set to +inf at the start of each compression phase
        self.s_m = 0  # steps without CE progress (memorization)
        self.s_c = 0  # steps without MBE progress (compression)
        self.switches = 0
        self.ce_avg, self.mbe_avg = None, None  # the running means the rules see when ema > 0
        self.last_switch = None

    def _smooth(self, avg, x):
        return x if avg is None or self.ema == 0 else self.ema * avg + (1 - self.ema) * x

    def _improved(self, x, best, absolute=0.0):
        if math.isinf(best):
            return True
        return x < best - absolute if absolute > 0 else x < best * (1 - self.delta)

    def _enter(self, phase, reason, **values):
        _switch(self, phase, reason, **values)
        if phase == 1:
            self.s_m = 0
        else:
            self.s_c = 0
            self.mbe_min, self.mbe_avg = None, None

    def step(self, ce, mbe=None):
        self.last_switch = None
        ce = self.ce_avg = self._smooth(self.ce_avg, float(ce))
        if self.phase == 1:
            self.s_m = 0 if self._improved(ce, self.ce_min) else self.s_m + 1
            self.ce_min = min(self.ce_min, ce)
            if self.s_m >= self.patience_memorize:
                self._enter(2, "ce_plateau", ce=ce, ce_min=self.ce_min, steps_without_progress=self.s_m)
        else:
            if ce > self.ce_min * (1 + self.tau):  # a CE spike against the best so far: back to memorizing
                self._enter(1, "ce_spike", ce=ce, ce_min=self.ce_min, ce_limit=self.ce_min * (1 + self.tau))
                return self.phase
            if mbe is None:
                raise ValueError("ProjectGate.step: the compression phase needs this step's per-layer MBE")
            mbe = [float(m) for m in (mbe if isinstance(mbe, (list, tuple)) else [mbe])]
            mbe = self.mbe_avg = [self._smooth(a, m) for a, m in zip(self.mbe_avg or [None] * len(mbe), mbe)]
            if self.mbe_min is None:
                self.mbe_min = [math.inf] * len(mbe)
            progress = any(self._improved(m, best, self.delta_mbe_abs) for m, best in zip(mbe, self.mbe_min))
            self.s_c = 0 if progress else self.s_c + 1
            self.mbe_min = [min(m, best) for m, best in zip(mbe, self.mbe_min)]
            self.ce_min = min(self.ce_min, ce)
            if self.s_c >= self.patience_compress:
                self._enter(1, "mbe_patience", mbe=mbe, mbe_min=self.mbe_min, steps_without_progress=self.s_c,
                            ce=ce, ce_min=self.ce_min)
        return self.phase
