"""
The GAPT versions behind one face. train.py holds the default, the rules of the author's training code of the paper's
time (`GAPT`, gapt_version="paper_era"); this file holds the author's two other versions and this project's own
earlier rules, and what every version shares: the registry, the switch reasons, the state round trip, and `Step`
(one optimizer step as the loop and a version share it, with `layers_mbe` and `step_means`).
docs/gapt_versions.md says where each rule was read in the author's code and where this code departs from it.

    algorithm1  fangyuan-ksgk/minimind src/sorl.py, GatedPhaseTransition (the paper's Algorithm 1 notation)
    later       fangyuan-ksgk/mod_gpt src/gapt.py + train_iblm.py + run_iblm.sh (the author's later code)
    project     this project's rules until 2026-12-01 (every result in docs/ measured before that date)

The face: the training loop asks the version and never names one. A version is a class decorated with @register:
    name, description          its gapt_version value and the words the run's first line says of it
    own_keys                   the config keys it reads that some other version does not (configurator.py refuses
                               those of other versions, set away from their defaults, with one line)
    layer_words                the words it takes for mbe_layers besides a list of blocks ("auto"; project: "rotate")
    auto_layers(n_layer)       its regularised blocks for mbe_layers="auto"
    check(c)                   its own config rules on the dict of settings: raise ValueError with one line that says
                               what to do (configurator.py reports it as a ConfigError), or nothing
    from_config(c, layers)     the gate for config c and the regularised blocks `layers`
    begin_step(step)           before an optimizer step's micro-batches (step: a Step, below: what the loop and the
                               version share for one step: phase, log_step, gated, N, iter_num, measure, ...)
    depth(step, j)             how many blocks micro-batch j needs: None (all, the head and its CE), or l + 1 for a
                               micro-batch that backpropagates block l's MBE alone
    micro_batch(step, j, ce, hidden)  the loss micro-batch j backpropagates (measuring through step.measure what the
                               gate and the log see); ce is None when depth was not None
    end_step(step)             after the optimizer step: feed the gate if step.gated; -> [(phase before, switch)]
    phase, switches, last_switch, step(ce, mbe) -> phase   the state machine; record_switch records a switch
    state_dict / load_state_dict   every attribute that is not in `settings` (the keyword arguments from the config)
tests/test_gapt_conformance.py runs every registered version through resume, DDP, compile, the switch records and
the state round trip; docs/reading_the_code.md says what a new version touches.
"""

import math

import torch
import torch.distributed as dist

from mbe import compiled_patched_mbe, patched_mbe

# why a phase ends, and the values every switch record of that reason carries (experiment.py's tables read these)
SWITCH_REASONS = {"ce_plateau": ("ce", "ce_min", "steps_without_progress"),
                  "ce_spike": ("ce", "ce_min", "ce_limit"),
                  "mbe_patience": ("mbe", "mbe_min", "steps_without_progress")}
VERSIONS = {}  # gapt_version -> its class, filled by @register (train.py registers the paper-era GAPT)


def register(cls):
    VERSIONS[cls.name] = cls
    return cls


def record_switch(gate, phase, reason, **values):
    """Every version switches through here: records why (a reason of SWITCH_REASONS with its values), changes phase,
    counts. A reason or a value missing is an error here, not a silent hole in experiment.py's tables."""
    missing = [k for k in SWITCH_REASONS.get(reason, ()) if k not in values]
    if reason not in SWITCH_REASONS or missing:
        raise ValueError(f"{type(gate).__name__}: a switch needs a reason of SWITCH_REASONS and its values "
                         f"{SWITCH_REASONS.get(reason)}; got {reason!r} missing {missing}")
    gate.last_switch = {"reason": reason, **values}
    gate.phase = phase
    gate.switches += 1


def gate_state_dict(gate):  # the state: every attribute but the settings (which come from the config)
    return {k: v for k, v in vars(gate).items() if k not in gate.settings and k != "last_switch"}


def load_gate_state(gate, state):
    for k, v in state.items():
        setattr(gate, k, v)


def middle_blocks(n_layer):  # every block but the first and the last (all of them when there are fewer than 3)
    return list(range(1, n_layer - 1)) if n_layer >= 3 else list(range(n_layer))


def nothing_before_a_step(gate, step):  # begin_step of a version that needs no set-up per step
    pass


def the_whole_model(gate, step, j):  # depth of a version whose every micro-batch runs all blocks and the head
    return None


def common_settings(c):  # the keys every version reads
    return dict(delta=c.gapt_delta, tau=c.gapt_tau, patience_memorize=c.gapt_patience_memorize,
                patience_compress=c.gapt_patience_compress, mbe_weight=c.mbe_weight)


def no_checks(c):
    pass


def measure_for_loss(gate, step, hidden, every_micro_batch=False):
    """algorithm1, later, project: compression measures the regularised layers with gradients (its loss needs them);
    a log step in memorization measures every layer without (for the log); every_micro_batch: the regularised ones on
    every micro-batch (later's gate is fed each one). -> (the layers measured, their MBE or None)."""
    every = list(range(step.n_layer))
    layers = every if step.log_step and step.phase == 1 else gate.layers if step.phase == 2 or every_micro_batch \
        else []
    return layers, step.measure(hidden, layers, grad=step.phase == 2)


def feed_step_means(gate, step, per_layer):
    """algorithm1, project: after the step, the gate sees the step's mean CE over micro-batches and processes, and in
    compression the regularised layers' mean MBE (per_layer: the list; else their mean)."""
    if not step.gated:
        return []
    mean_loss, mean_ce, mean_mbe = step.means()
    step.check_finite(mean_loss)
    regularised = [mean_mbe[i] for i in gate.layers] if step.phase == 2 else None
    gate.step(mean_ce, regularised if per_layer or regularised is None else sum(regularised) / len(regularised))
    return [(step.phase, gate.last_switch)] if gate.last_switch else []


def layers_mbe(hidden, layers, c):
    """S_α of the residual stream after each block in layers: hidden (n_layer, B, T, D) -> (len(layers),), each the
    mean over patches of mbe_patch_size tokens (contiguous layers a view, others a copy; compiled fused if compile)."""
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    picked = hidden[layers[0]:layers[-1] + 1] if contiguous else hidden[layers]
    return (compiled_patched_mbe() if c.compile else patched_mbe)(picked, c.mbe_patch_size, c.mbe_alpha, c.mbe_center)


def step_means(loss_ce, mbe_sum, mbe_count, world):
    """Over all processes: the mean loss, the mean CE over the micro-batches that computed one (loss_ce: loss, CE and
    the share of micro-batches with a CE, each process's mean over its micro-steps), and each layer's mean MBE over the
    micro-batches that measured it (None where none did)."""
    t = torch.cat([loss_ce, mbe_sum, mbe_count])
    for _ in (0,) if world > 1 else ():
        dist.all_reduce(t)
    loss, ce, share = (t[:3] / world).tolist()
    ce = ce / share if share else None
    sums, counts = t[3:].view(2, -1).tolist()
    return loss, ce, [s / n if n else None for s, n in zip(sums, counts)]


class Step:
    """One optimizer step as the loop and the GAPT version share it: the phase it trains in, whether it logs, whether
    the gate is fed (gapt_mode="gapt"), and what its micro-batches measured: loss and CE (each this process's mean
    over its micro-steps; the CE over those that computed one: a micro-batch that stops at its block has none), every
    layer's MBE summed over the micro-batches that measured it, and each micro-batch's
    (CE, compression term) for a gate fed per micro-batch. A version may keep what one step needs on it."""

    def __init__(self, c, phase, log_step, iter_num, rank, world, check_finite, ddp_model=None):
        self.c, self.phase, self.log_step, self.iter_num, self.world = c, phase, log_step, iter_num, world
        self.ddp_model = ddp_model
        self.gated, self.n_layer, self.check_finite = c.gapt_mode == "gapt", c.n_layer, check_finite
        self.N = c.gradient_accumulation_steps  # micro-batches over all processes; j = rank * micro_steps + micro
        self.micro_steps, self.rank = self.N // world, rank
        self.loss = torch.zeros(3, device=c.device)  # loss, CE (of the micro-batches that computed one), their share
        self.mbe_sum, self.mbe_count = torch.zeros(2, c.n_layer, device=c.device)
        self.signal = torch.zeros(self.N, 2, device=c.device)

    def last_here(self, j):  # this process's last micro-batch of the step
        return j == (self.rank + 1) * self.micro_steps - 1

    def measure(self, hidden, layers, grad, count=True):
        """The MBE of these layers of one micro-batch (None if none), with or without gradients; counted for the log
        and the gates fed by means unless count=False."""
        if not layers:
            return None
        with torch.set_grad_enabled(grad):
            mbe = layers_mbe(hidden, layers, self.c)
        if count:
            self.mbe_sum[layers] += mbe.detach().float()
            self.mbe_count[layers] += 1
        return mbe

    def with_every_parameter(self, loss):
        """A loss that leaves parameters out of its graph (one block's MBE alone: the blocks above, the head), made
        fit for DDP, whose gradient reduction expects every parameter in the graph: every one joins at weight 0."""
        if self.ddp_model is None:
            return loss
        return loss + 0.0 * sum(p.sum() for p in self.ddp_model.parameters())

    def sum_over_processes(self, t):
        for _ in (0,) if self.world > 1 else ():
            dist.all_reduce(t)
        return t

    def means(self):  # over all processes: mean loss, mean CE, each layer's mean MBE (None where none measured it)
        return step_means(self.loss, self.mbe_sum, self.mbe_count, self.world)


@register
class Algorithm1Gate:
    """minimind's GatedPhaseTransition.step(ssl_loss, abs_loss), with the mean MBE of the regularised layers as the
    auxiliary loss (minimind gates another auxiliary loss; the MBE analogue is this project's choice). Compression
    backpropagates CE + w · mean MBE; the gate is fed once per optimizer step, after it, with the step's mean CE and
    mean MBE over micro-batches and processes.

    Absolute δ for CE and MBE alike; E_min updated on every step, before the spike test; entering compression resets
    E_min and the MBE minimum to +inf; the MBE minimum is updated in compression only, not on a spike step."""
    name, description = "algorithm1", "the author's class in the notation of the paper's Algorithm 1 (minimind src/sorl.py)"
    own_keys, layer_words = (), ("auto",)
    settings = ("delta", "tau", "patience_memorize", "patience_compress", "mbe_weight", "layers")
    _enter, state_dict, load_state_dict = record_switch, gate_state_dict, load_gate_state
    check = staticmethod(no_checks)
    begin_step, depth = nothing_before_a_step, the_whole_model

    def __init__(self, *, delta=0.01, tau=0.1, patience_memorize=10, patience_compress=10, mbe_weight=1.0, layers=()):
        self.delta, self.tau, self.patience_memorize, self.patience_compress = delta, tau, patience_memorize, \
            patience_compress
        self.mbe_weight, self.layers = mbe_weight, list(layers)
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

    @staticmethod
    def auto_layers(n_layer):  # as paper_era: the author's start_layer=2, end_layer=n_layer-2
        return list(range(2, n_layer - 2)) if n_layer >= 5 else middle_blocks(n_layer)

    @classmethod
    def from_config(cls, c, layers):
        return cls(**common_settings(c), layers=layers)

    def micro_batch(self, step, j, ce, hidden):
        layers, mbe = measure_for_loss(self, step, hidden)
        return ce + self.mbe_weight * mbe.mean() if step.phase == 2 else ce

    def end_step(self, step):
        return feed_step_means(self, step, per_layer=False)


@register
class LaterGate:
    """mod_gpt src/gapt.py GatedPhaseTransition as train_iblm.py drives it: compression backpropagates
    CE + max(w · mean MBE, 1e-5) (src/gapt.py's clamp); the gate is fed once per micro-batch, in order over all
    processes, after the optimizer step, with that micro-batch's CE and its term w · mean MBE of the regularised
    layers; a step's micro-batches all use the phase the step began with. A call whose CE or MBE is not finite
    changes nothing (src/gapt.py's step() returns before its rules).

    Relative gains (min − x) / max(|min|, 1e-6), 0 while min is +inf (so the first call is no progress); both
    minima global, updated on every call in both phases, never reset; a CE above the minimum before this call
    times (1 + τ) ends compression; each counter counts in its own phase and restarts at the switch it causes."""
    name, description = "later", "the author's later code (mod_gpt src/gapt.py + train_iblm.py + run_iblm.sh)"
    own_keys, layer_words = ("gapt_delta_mbe",), ("auto",)
    settings = ("delta", "delta_mbe", "tau", "patience_memorize", "patience_compress", "mbe_weight", "layers")
    _enter, state_dict, load_state_dict = record_switch, gate_state_dict, load_gate_state
    check = staticmethod(no_checks)
    begin_step, depth = nothing_before_a_step, the_whole_model
    auto_layers = staticmethod(middle_blocks)  # run_iblm.sh's --mbe_schedule all_middle

    def __init__(self, *, delta=0.01, delta_mbe=0.01, tau=0.1, patience_memorize=125, patience_compress=75,
                 mbe_weight=20.0, layers=()):
        self.delta, self.delta_mbe, self.tau = delta, delta_mbe, tau
        self.mbe_weight, self.layers = mbe_weight, list(layers)
        self.patience_memorize, self.patience_compress = patience_memorize, patience_compress
        self.phase, self.s_m, self.s_c, self.switches, self.last_switch = 1, 0, 0, 0, None
        self.ce_min, self.mbe_min = math.inf, math.inf

    @staticmethod
    def _gain(x, best):
        return 0.0 if math.isinf(best) or abs(best) < 1e-9 else (best - x) / max(abs(best), 1e-6)

    def step(self, ce, mbe):
        self.last_switch = None
        if not (math.isfinite(ce) and math.isfinite(mbe)):
            return self.phase
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

    @classmethod
    def from_config(cls, c, layers):
        return cls(**common_settings(c), delta_mbe=c.gapt_delta_mbe, layers=layers)

    def micro_batch(self, step, j, ce, hidden):
        layers, mbe = measure_for_loss(self, step, hidden, every_micro_batch=True)
        picked = mbe.detach().float()[[layers.index(i) for i in self.layers]]
        step.signal[j] = torch.stack([ce.detach().float(), self.mbe_weight * picked.mean()])
        return ce + (self.mbe_weight * mbe.mean()).clamp_min(1e-5) if step.phase == 2 else ce

    def end_step(self, step):
        if not step.gated:
            return []
        switches = []
        for ce, mbe in step.sum_over_processes(step.signal).tolist():  # micro-batch j of the step, in order
            step.check_finite(ce)
            before = self.phase
            if self.step(ce, mbe) != before:
                switches.append((before, self.last_switch))
        return switches


@register
class ProjectGate:
    """This project's rules until 2026-12-01, fed once per optimizer step with the step's mean CE and per-layer MBE
    (after the step; the MBE is ignored in phase 1). "x improved on best" means best is +inf or
    x < best·(1 − delta); with delta_mbe_abs > 0, an MBE improves only if it drops by more than that absolute
    amount. Phase 1 → 2 after patience_memorize steps without CE progress (ce_plateau), with fresh per-layer MBE
    minima; in phase 2 a CE above the run's best CE · (1 + tau) ends compression at once (ce_spike), and
    patience_compress steps in which no layer's MBE improved on its own minimum end it too (mbe_patience).

    ema > 0: the rules see exponential moving averages (weight 1 − ema on the new value) of CE and of each layer's
    MBE instead of the raw step values, so that batch noise in a small step's CE can neither fake progress nor a
    spike. The MBE average restarts with each compression phase.

    Compression backpropagates CE + w · mean over the regularised layers of relu(MBE − mbe_floor), or with
    mbe_layers="rotate" only one layer's, cycling with the step."""
    name, description = "project", "this project's own rules until 2026-12-01"
    own_keys = ("gapt_ema", "mbe_floor", "gapt_delta_mbe_abs")
    settings = ("delta", "tau", "patience_memorize", "patience_compress", "delta_mbe_abs", "ema", "mbe_weight",
                "mbe_floor", "rotate", "layers")
    layer_words = ("auto", "rotate")  # mbe_layers="rotate": one regularised layer per step, cycling
    state_dict, load_state_dict = gate_state_dict, load_gate_state
    check, auto_layers = staticmethod(no_checks), staticmethod(middle_blocks)
    begin_step, depth = nothing_before_a_step, the_whole_model

    def __init__(self, *, delta=0.01, tau=0.1, patience_memorize=125, patience_compress=75, delta_mbe_abs=0.0,
                 ema=0.0, mbe_weight=0.1, mbe_floor=0.0, rotate=False, layers=()):
        self.delta, self.tau, self.delta_mbe_abs, self.ema = delta, tau, delta_mbe_abs, ema
        self.mbe_weight, self.mbe_floor, self.rotate, self.layers = mbe_weight, mbe_floor, rotate, list(layers)
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
        record_switch(self, phase, reason, **values)
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

    @classmethod
    def from_config(cls, c, layers):
        return cls(**common_settings(c), delta_mbe_abs=c.gapt_delta_mbe_abs, ema=c.gapt_ema, mbe_floor=c.mbe_floor,
                   rotate=c.mbe_layers == "rotate", layers=layers)

    def micro_batch(self, step, j, ce, hidden):
        layers, mbe = measure_for_loss(self, step, hidden)
        if step.phase == 1:
            return ce
        penalty = (mbe - self.mbe_floor).clamp_min(0)
        return ce + self.mbe_weight * (penalty[step.iter_num % len(penalty)] if self.rotate else penalty.mean())

    def end_step(self, step):
        return feed_step_means(self, step, per_layer=True)
