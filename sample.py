"""
Generate from a trained checkpoint: text for BPE (FineWeb-style) runs, answers for the multiplication task.

    python sample.py --out_dir=out-fineweb-cpu --start="The function" --num_samples=3 --max_new_tokens=100
    python sample.py --out_dir=out-mult-gapt --start="123*45="          # greedy answer, checked against the truth
    python sample.py --out_dir=out-mult-gapt --start=FILE:prompts.txt   # one prompt per line
    python sample.py --init_from=gpt2 --start="The Linux kernel"         # OpenAI's GPT-2 (or gpt2-medium, -large, -xl)
    python sample.py --init_from=hf-kernel-docs-gapt --start="The"       # a Hub-layout folder (export_hf.py writes one)

The checkpoint's data directory (config data_dir) says which decoder to use: meta.json with task "multiplication"
uses prepare_mult's characters, anything else GPT-2's BPE (tiktoken r50k_base); pretrained GPT-2 uses the BPE.
"""

import argparse
import os

import torch

from checkpoint import CheckpointError, load_checkpoint
from hub import PretrainedError, from_pretrained
from model import GPT, GPTConfig
from shards import read_meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out-mult-gapt", help="directory holding ckpt.pt")
    parser.add_argument("--init_from", default="resume",
                        help="resume (out_dir/ckpt.pt), gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hub-layout folder")
    parser.add_argument("--start", default="\n", help="the prompt, or FILE:path for one prompt per line")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; default 0.8 for text, greedy for multiplication")
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--data_dir", help="where the run's meta.json is (default: the checkpoint's data_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature {args.temperature} is negative; give 0 (greedy) or a positive temperature")
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.top_k < 1:
        parser.error("--max_new_tokens, --num_samples and --top_k must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device={args.device} but torch sees no CUDA device here; pass --device=cpu")
    if args.start.startswith("FILE:") and not os.path.isfile(args.start[5:]):
        parser.error(f"prompt file {args.start[5:]!r} not found (--start=FILE:path reads one prompt per line)")

    if args.init_from != "resume":
        try:
            model = from_pretrained(args.init_from)
        except PretrainedError as e:
            parser.exit(1, f"error: {e}\n")
        data_dir = args.data_dir
        meta = read_meta(data_dir) if data_dir else {"tokenizer": "r50k_base"}
        if not data_dir and model.config.vocab_size < 50257:  # not GPT-2's BPE: e.g. an exported multiplication model
            parser.exit(1, f"error: {args.init_from} has a vocabulary of {model.config.vocab_size} tokens, not GPT-2's "
                           f"50257; pass --data_dir=<the directory it was trained on> so that its meta.json names "
                           f"the tokenizer\n")
    else:
        try:
            checkpoint = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
        except CheckpointError as e:
            parser.exit(1, f"error: {e}\n")
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
        data_dir = args.data_dir or checkpoint["config"]["data_dir"]
        meta = read_meta(data_dir) if os.path.isdir(data_dir) else {}
    model.eval().to(args.device)
    torch.manual_seed(args.seed)
    if not meta:
        parser.error(f"{data_dir}/meta.json not found, so the tokenizer is unknown: run from the directory you "
                     f"trained in, or pass --data_dir")
    prompts = [args.start]
    if args.start.startswith("FILE:"):
        with open(args.start[5:]) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]

    if meta.get("task") == "multiplication":
        import prepare_mult as pm
        for prompt in prompts:
            prompt = prompt.strip()
            try:
                ids = torch.tensor([pm.encode("\n" + prompt)], device=args.device)
            except ValueError as e:
                parser.exit(1, f"error: prompt {prompt!r}: {e}; a multiplication prompt looks like 123*45=\n")
            with torch.no_grad():
                out = model.generate(ids, args.max_new_tokens, temperature=args.temperature or 0.0,
                                     top_k=args.top_k, stop_token=pm.END)
            answer = pm.decode(out[0, ids.size(1):].tolist()).split("\n")[0]
            line = f"{prompt}{answer}"
            if prompt.endswith("=") and prompt.count("*") == 1:
                a, b = (int(v) for v in prompt[:-1].split("*"))
                truth = pm.answer_text(a, b, meta["reverse_answer"])
                line += "  (correct)" if answer == truth else f"  (wrong: {truth})"
            print(line)
        return

    import tiktoken
    enc = tiktoken.get_encoding(meta.get("tokenizer", "r50k_base"))
    for prompt in prompts:
        ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
        x = torch.tensor([ids] * args.num_samples, device=args.device)
        with torch.no_grad():
            temperature = 0.8 if args.temperature is None else args.temperature
            out = model.generate(x, args.max_new_tokens, temperature=temperature, top_k=args.top_k)
        for row in out.tolist():
            print(enc.decode([t for t in row if t < enc.n_vocab]))
            print("-" * 40)


if __name__ == "__main__":
    main()
