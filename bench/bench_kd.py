"""What the token-level distillation term costs a training step: the same student, batch and optimizer, with and
without beta * kd_loss from a stored top-k teacher, steps alternating side by side in one process.

    OMP_NUM_THREADS=2 python bench/bench_kd.py [--steps 10] [--top_k 20] [--batch_size 8] [--kd_loss forward_kl]

The student is the benchmark's reference T5 shape (vocabulary 32128, d_model 256, 4+4 layers) at random weights; a
batch of predict rows (100 input tokens, 4 label tokens) and explain rows (100 input tokens, 64 rationale tokens);
the stored teacher is random top-k ids and log-probabilities (what it holds does not change the arithmetic). Each
step: zero_grad, the fused loss (fast_loss.grouped_loss), backward, AdamW. Prints the median step of each and the
ratio.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import KD_LOSSES  # noqa: E402
from distill import KdTerm, TopKTokens  # noqa: E402
from fast_loss import grouped_loss  # noqa: E402

REFERENCE_SHAPE = dict(vocab_size=32128, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=4,
                       num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
INPUT_TOKENS, LABEL_TOKENS, RATIONALE_TOKENS = 100, 4, 64


def view(rows: int, inputs: int, targets: int, vocabulary: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(2, vocabulary, (rows, inputs)),
            "attention_mask": torch.ones(rows, inputs, dtype=torch.long),
            "labels": torch.randint(2, vocabulary, (rows, targets))}


def stored_teacher(tokens: int, k: int, vocabulary: int) -> TopKTokens:
    logits = torch.randn(tokens, k) * 3
    top = torch.log_softmax(logits, dim=-1) + torch.log(torch.tensor(0.9))  # the top k hold 90% of the mass
    ids = torch.stack([torch.randperm(vocabulary)[:k] for _ in range(tokens)])
    return TopKTokens(ids, top.sort(dim=-1, descending=True).values, vocabulary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--kd_loss", choices=KD_LOSSES, default=KD_LOSSES[0])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**REFERENCE_SHAPE)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocabulary = REFERENCE_SHAPE["vocab_size"]
    views = [view(args.batch_size, INPUT_TOKENS, LABEL_TOKENS, vocabulary),
             view(args.batch_size, INPUT_TOKENS, RATIONALE_TOKENS, vocabulary)]
    tokens = args.batch_size * (LABEL_TOKENS + RATIONALE_TOKENS)
    term = KdTerm(0.5, 1.0, args.kd_loss, stored_teacher(tokens, args.top_k, vocabulary))
    times: dict[str, list[float]] = {"without the term": [], f"with top-{args.top_k} {args.kd_loss}": []}

    def step(kd) -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        grouped_loss(model, views, [0.5, 0.5], kd).backward()
        optimizer.step()
        return time.perf_counter() - start

    step(None), step(term)  # warm-up
    for _ in range(args.steps):
        for (name, durations), kd in zip(times.items(), (None, term)):
            durations.append(step(kd))
    medians = {name: statistics.median(durations) for name, durations in times.items()}
    for name, median in medians.items():
        print(f"{name}: median step {median * 1000:.0f} ms over {args.steps} steps")
    base, with_term = medians.values()
    print(f"ratio {with_term / base:.3f} ({tokens} target tokens per step, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
