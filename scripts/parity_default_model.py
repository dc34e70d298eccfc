"""How close the default SmolLM2 is to transformers' own GGUF loader (the test asserts 1e-3).

    python scripts/parity_default_model.py --tokens 128

Prints the largest and mean absolute logit difference on the opening of Pride and
Prejudice (embedded in tests/test_default_model.py), float32 on the CPU.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import pcomp_jax
    from pcomp_jax.checkpoints import DEFAULT_GGUF, default_model_path
    from test_default_model import TEXT

    ours = pcomp_jax.load_model()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_model_path()), gguf_file=DEFAULT_GGUF,
                                               dtype=torch.float32).eval()
    ids = np.asarray(ours.tokenizer(TEXT)["input_ids"][: args.tokens])[None]
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    diff = np.abs(pcomp_jax.forward(ours, ids) - theirs)
    print(f"{ids.shape[1]} tokens: max |logit difference| {diff.max():.2e}, mean {diff.mean():.2e}")


if __name__ == "__main__":
    main()
