"""
Write a trained checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors), for transformers,
lm-evaluation-harness or the Hub. The tokenizer is GPT-2's: load it from openai-community/gpt2.

    python export_hf.py --out_dir=out-kernel-docs-gapt --hf_dir=hf-kernel-docs-gapt
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf-kernel-docs-gapt')"
    lm_eval --model hf --model_args pretrained=hf-kernel-docs-gapt,tokenizer=openai-community/gpt2 --tasks hellaswag

The folder also works as train.py's --init_from (fine-tune it further) and sample.py's --init_from.
"""

import argparse
import os
import sys

import torch

from checkpoint import CheckpointError, load_checkpoint
from hub import save_hf_folder
from model import GPT, GPTConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="the run directory holding ckpt.pt")
    parser.add_argument("--hf_dir", required=True, help="the folder to write config.json and model.safetensors to")
    args = parser.parse_args(argv)
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist; pass the out_dir of a trained run")
    if os.path.exists(args.hf_dir) and not os.path.isdir(args.hf_dir):
        sys.exit(f"error: --hf_dir={args.hf_dir} is a file, not a folder; pick another --hf_dir")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    save_hf_folder(model, args.hf_dir)
    print(f"wrote {args.hf_dir}: config.json and model.safetensors ({model.get_num_params(False) / 1e6:.2f}M "
          f"parameters, iter {checkpoint['iter_num']} of {args.out_dir})")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
