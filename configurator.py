"""
train.py's configuration: its DEFAULTS, then config files (plain Python assignments) and --key=value overrides, in
the order given. An unknown key, a value of the wrong type, a NaN or infinity, or a value out of range is one
ConfigError that names the key. Not part of the algorithm: train.py calls load_config and reads the result.

Adding a config key: give it a default in train.py's DEFAULTS, a row in README.md's table, and a range here
(tests/test_train.py checks that every key has all three).
"""

import ast
import importlib.util
import math
import os
from types import SimpleNamespace

import torch

from gapt_versions import VERSIONS
from hub import PRETRAINED


class ConfigError(ValueError):
    pass


# keys whose value may have another type than their default's
KEY_TYPES = {"mbe_layers": (str, list, tuple), "eval_data_dirs": (str, list, tuple)}

# the range of every key that is not a bool (a bool's type is its range)
CHOICES = {"gapt_mode": ("off", "gapt", "always", "random"), "optimizer": ("adamw", "muon"),
           "dtype": ("auto", "float32", "bfloat16", "float16")}  # gapt_version: a name of gapt_versions.VERSIONS
POSITIVE = ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
            "eval_interval", "log_interval", "eval_iters", "gapt_tau", "gapt_patience_memorize",
            "gapt_patience_compress", "mbe_alpha", "ddp_timeout")
NON_NEGATIVE = ("learning_rate", "max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                "mbe_weight", "mbe_floor", "gapt_delta_mbe_abs",
                "gapt_delta", "gapt_delta_mbe", "num_threads", "peak_flops", "align_interval",
                "vocab_size", "mbe_patch_size", "seed")
FRACTION = ("dropout", "beta1", "beta2", "gapt_ema")  # in [0, 1)
UNIT_INTERVAL = ("gapt_random_share",)  # in [0, 1]
FREE_TEXT = ("out_dir", "wandb_project", "wandb_run_name", "data_dir", "device")  # any string (device: checked
# against the machine by train.py)
CHECKED_BELOW = ("init_from", "mbe_layers", "eval_data_dirs", "gapt_version")  # by validate() itself


def load_config(args, defaults, doc=""):
    """defaults, then each config file and --key=value override in the order given -> a SimpleNamespace. --help
    prints doc and every key with its default, and exits."""
    if {"-h", "--help"} & set(args):
        print(doc + "\nconfig keys and their defaults (README.md explains each):")
        print("\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
        raise SystemExit(0)
    config = dict(defaults)
    for arg in args:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override {arg!r} must look like --key=value")
            if isinstance(defaults.get(key), str) and key not in KEY_TYPES:
                value = text  # strings need no quotes: --device=cpu
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = float(text) if text.lower() in ("nan", "inf", "-inf") else text
            config[key] = checked(defaults, key, value, arg)
        else:
            for key, value in read_config_file(arg).items():
                config[key] = checked(defaults, key, value, arg)
    validate(config, defaults)
    return SimpleNamespace(**config)


def explicit_keys(args):
    """The keys that config files and --key=value overrides in args set (whatever their values): what a resume takes
    from this command rather than from the checkpoint."""
    keys = set()
    for arg in args:
        if arg.startswith("--"):
            keys.add(arg[2:].partition("=")[0])
        elif os.path.isfile(arg):
            keys |= set(read_config_file(arg))
    return keys


def read_config_file(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (arguments are config files or --key=value)")
    names = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), {}, names)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}; a config file holds Python assignments "
                          f"such as max_iters = 500") from None
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run ({type(e).__name__}: {e}); a config file holds "
                          f"Python assignments such as max_iters = 500") from None
    return {k: v for k, v in names.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def checked(defaults, key, value, source):
    if key not in defaults:
        close = [k for k in defaults if k.split("_")[0] == key.split("_")[0]]
        private = "" if source.startswith("--") else (f"; a config file's own helper names (and imported names) start "
                                                      f"with _ and are not keys: _{key} = ...")
        raise ConfigError(f"unknown config key {key!r} in {source}" + (
            f"; known keys like it: {', '.join(close)}" if close else "; python train.py --help lists the keys")
            + private)
    default = defaults[key]
    allowed = KEY_TYPES.get(key, (type(default),))
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --learning_rate=1 means 1.0
    if isinstance(value, bool) != isinstance(default, bool) and key not in KEY_TYPES:
        raise ConfigError(f"config key {key!r}: expected {type(default).__name__}, got {value!r} (in {source})")
    if not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"config key {key!r}: expected {names}, got {type(value).__name__} {value!r} (in {source})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} is {value} (in {source}); give a finite number")
    if key == "eval_data_dirs":  # one directory may be given as a plain string
        value = [value] if isinstance(value, str) else list(value)
        if not all(isinstance(d, str) for d in value):
            raise ConfigError(f"config key 'eval_data_dirs': expected a list of directory names, got {value!r}")
    return value


def validate(c, defaults):
    """Ranges and the relations between keys. The regularised layers are checked against the model's depth by
    train.py, once the depth of a resumed or pretrained model is known."""
    if c["init_from"] not in ("scratch", "resume", *PRETRAINED) and not os.path.isdir(c["init_from"]):
        raise ConfigError(f"init_from must be scratch, resume, one of {', '.join(PRETRAINED)}, or a folder holding a "
                          f"GPT-2 in the Hugging Face layout (config.json + model.safetensors); got {c['init_from']!r}")
    for key, allowed in CHOICES.items():
        if c[key] not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {c[key]!r}")
    for keys, ok, what in ((POSITIVE, lambda v: v > 0, "positive"), (NON_NEGATIVE, lambda v: v >= 0, "non-negative"),
                           (FRACTION, lambda v: 0 <= v < 1, "in [0, 1)"), (UNIT_INTERVAL, lambda v: 0 <= v <= 1,
                                                                           "in [0, 1]")):
        for key in keys:
            if not ok(c[key]):
                raise ConfigError(f"config key {key!r} must be {what}, got {c[key]}")
    if c["mbe_patch_size"] and c["block_size"] % c["mbe_patch_size"]:
        raise ConfigError(f"block_size {c['block_size']} is not divisible by mbe_patch_size {c['mbe_patch_size']}; "
                          f"pick a patch size that divides it (or 0 for the whole sequence)")
    if c["optimizer"] == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optimizer='muon' needs torch.optim.Muon (PyTorch 2.9 or newer; this is "
                          f"{torch.__version__}): upgrade torch (pip install -r requirements.txt) or pass "
                          f"--optimizer=adamw")
    names = [os.path.basename(os.path.normpath(d)) for d in c["eval_data_dirs"]]
    if len(set(names)) < len(names) or set(names) & {"train", "val", "test"}:
        raise ConfigError(f"eval_data_dirs: their folder names ({', '.join(names)}) name their metrics (NAME_ce), "
                          f"so they must differ from each other and from train, val and test; rename or link them")
    check_gapt_version(c, defaults)
    for key in ("out_dir", "data_dir", "device"):
        if not c[key].strip():
            raise ConfigError(f"config key {key!r} is empty; give it a value (python train.py --help lists the "
                              f"defaults)")
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:  # before --overwrite_out_dir deletes anything
        raise ConfigError("wandb_log=True needs the wandb package: pip install wandb, or leave wandb_log out")
    if c["mbe_patch_size"] == 1:
        raise ConfigError("mbe_patch_size=1 makes every MBE matrix one token, whose entropy is 0 whatever the model "
                          "does: compression would train nothing; give 0 (the whole sequence) or 2 or more")
    if c["mbe_weight"] == 0 and c["gapt_mode"] != "off":
        raise ConfigError(f"mbe_weight=0 with gapt_mode={c['gapt_mode']!r}: the compression term is 0, so "
                          f"compression would train nothing but CE; give mbe_weight > 0, or --gapt_mode=off")
    if c["min_lr"] > c["learning_rate"]:
        raise ConfigError(f"config key 'min_lr' ({c['min_lr']}) must not exceed learning_rate ({c['learning_rate']})")
    if c["n_embd"] % c["n_head"]:
        raise ConfigError(f"config key 'n_embd' ({c['n_embd']}) must be divisible by n_head ({c['n_head']})")


def check_gapt_version(c, defaults):
    """The GAPT version's own rules, all from its class (gapt_versions.py): its name, its words for mbe_layers, the
    keys only other versions read (refused when set away from their default: they would silently do nothing), its
    own checks; gapt_random_share only means something under gapt_mode="random"."""
    version = VERSIONS.get(c["gapt_version"])
    if version is None:
        raise ConfigError(f"config key 'gapt_version' must be one of {tuple(VERSIONS)}, got {c['gapt_version']!r}")
    layers = c["mbe_layers"]
    if isinstance(layers, str) and layers not in version.layer_words:
        takers = [name for name, v in VERSIONS.items() if layers in v.layer_words]
        raise ConfigError(f"mbe_layers={layers!r} is an option of gapt_version {' / '.join(map(repr, takers))}, not "
                          f"of {version.name!r}; give {' or '.join(map(repr, version.layer_words))} or a list of "
                          f"layer indices" if takers else f"mbe_layers must be 'auto' or a list of layer indices, "
                          f"got {layers!r}")
    if not isinstance(layers, str) and (not layers or not all(type(i) is int for i in layers)):
        raise ConfigError(f"mbe_layers must name at least one layer index, got {list(layers)!r}")
    for key in sorted({k for v in VERSIONS.values() for k in v.own_keys} - set(version.own_keys)):
        if c[key] != defaults[key]:
            readers = [name for name, v in VERSIONS.items() if key in v.own_keys]
            raise ConfigError(f"config key {key!r}={c[key]!r} is read by gapt_version {' / '.join(map(repr, readers))}"
                              f" only, not by {version.name!r}, where it would do nothing: choose one of those "
                              f"versions, or leave {key} out")
    if c["gapt_mode"] != "random" and c["gapt_random_share"] != defaults["gapt_random_share"]:
        raise ConfigError(f"config key 'gapt_random_share' is read only with gapt_mode='random' (this run has "
                          f"gapt_mode={c['gapt_mode']!r}, where it would do nothing): add --gapt_mode=random, or leave "
                          f"it out")
    try:
        version.check(c)
    except ValueError as e:  # a version in gapt_versions.py cannot import ConfigError (imports point one way)
        raise ConfigError(str(e)) from None
