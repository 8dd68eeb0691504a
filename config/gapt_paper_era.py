# GAPT with the rules of the author's training code of the paper's time (fangyuan-ksgk/mod_gpt train_pcgrad.py
# --switch_phase, RRScheduler in src/utils.py; run.sh): train.py's defaults, written out so that this preset can follow
# any task config: python train.py config/mult_baseline.py config/gapt_paper_era.py. Needs 2 or more micro-batches per
# step (gradient_accumulation_steps). docs/gapt_versions.md: each rule, where it was read, and the departures.
# --gapt_count_mbe_progress=False: the later RRScheduler copies, which never count MBE progress.
gapt_mode = "gapt"
gapt_version = "paper_era"
mbe_weight = 1.0
gapt_delta = 0.01
gapt_delta_mbe = 0.002
gapt_tau = 0.1
gapt_patience_memorize = 125
gapt_patience_compress = 125
gapt_count_mbe_progress = True
mbe_layers = "auto"
# the project version's options, off (a preset may follow a config that set them)
gapt_ema = 0.0
mbe_floor = 0.0
gapt_delta_mbe_abs = 0.0
