"""What a saved student computes, in whichever transformers runs this file (4.30 to 5): for each text, its token ids,
the greedy generation and the logits along it. tests/test_portable.py runs it under an older transformers, on a
folder a run saved, and compares with what the project computes from the same folder.

    python load_probe.py '{"folders": {"t5": ".../best"}, "texts": {"t5": ["..."]}, "max_new_tokens": 8,
                           "logits_file": "logits.pt"}'
    # prints {"t5": [per text: {ids, generated}]} as JSON; logits_file gets {"t5": [per text: logits]} (torch.save)

Only torch and transformers are imported, in APIs that every version since 4.30 has.
"""

import json
import sys


def probe(tokenizer, model, texts: list[str], max_new_tokens: int) -> list[dict]:
    """Per text: `ids` (the tokenizer's, special tokens included), `generated` (greedy, one row at a time, the new
    tokens only for a decoder-only model) and `logits` (a forward pass over the generation, a float tensor)."""
    import torch

    seq2seq = model.config.is_encoder_decoder
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            tokens = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                num_beams=1, do_sample=False, no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0,
                pad_token_id=pad,
            )
            if seq2seq:
                logits = model(input_ids=input_ids, decoder_input_ids=tokens).logits
                generated = tokens[0].tolist()
            else:
                logits = model(input_ids=tokens).logits
                generated = tokens[0, len(ids):].tolist()
        rows.append({"ids": ids, "generated": generated, "logits": logits[0].float()})
    return rows


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    request = json.loads(sys.argv[1])
    results, logits = {}, {}
    for name, folder in request["folders"].items():
        seq2seq = AutoConfig.from_pretrained(folder).is_encoder_decoder
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder).eval()
        results[name] = probe(tokenizer, model, request["texts"][name], request["max_new_tokens"])
        logits[name] = [row.pop("logits") for row in results[name]]
    torch.save(logits, request["logits_file"])
    print(json.dumps(results))

if __name__ == "__main__":
    main()
