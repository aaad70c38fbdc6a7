"""Tiny random causal LMs and a byte-level tokenizer, built offline from a transformers config.

Used by the test suite, the kill/resume script and anyone who wants to try qlora without weights:
`python -m tiny DIR --arch llama` writes a loadable model directory.
"""

from __future__ import annotations

import argparse

import torch

ARCHS = ("llama", "qwen2", "gemma3", "gpt2")

# ChatML, as SmolLM2-Instruct uses it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer: one token per UTF-8 byte, plus ChatML specials (vocab 260)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 260, hidden: int = 64, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=257, eos_token_id=258, pad_token_id=259)
    if arch == "llama":
        return tf.LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, **common,
        )
    if arch == "qwen2":
        return tf.Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, **common,
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
            sliding_window=64, **common,
        )
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A randomly initialised causal LM in fp32 (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    return model.eval()


def save_tiny(path: str, arch: str = "llama", seed: int = 0) -> str:
    """Write a tiny model + tokenizer as a normal transformers directory (safetensors)."""
    tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_adapter(root, arch: str = "llama", seed: int = 0, b_scale: float = 0.05, **lora) -> tuple[str, str]:
    """A tiny model dir and a non-trivial PEFT adapter for it (lora_B random, ~b_scale, so it changes
    outputs); lora: LoRA settings over r 4, alpha 8, no dropout (rslora=True, dora=True, ...)."""
    from qlora import hf
    from qlora.adapters import save_adapter
    from qlora.nn.surgery import lora_layers

    model_dir = save_tiny(str(root / f"model-{arch}"), arch)
    net, _ = hf.load(model_dir, lora=dict(r=4, alpha=8, dropout=0.0) | lora)
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(net).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * b_scale
    adapter_dir = str(root / f"adapter-{arch}")
    save_adapter(net, adapter_dir, model_dir)
    return model_dir, adapter_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="write a tiny random causal LM directory")
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(save_tiny(a.out, a.arch, a.seed))


if __name__ == "__main__":
    main()
