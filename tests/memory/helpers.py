"""Settings shared by the memory tests."""

from qlora.config import build_config

# The paper's setting (section 4 / figure 6): NF4 + DQ, LoRA r=64 on every linear layer, batch 1 of 512
# tokens, gradient checkpointing, paged AdamW, bf16 compute; its code (artidoro/qlora) keeps the LoRA
# weights in bf16 too. Device memory of a GPU.
PAPER = dict(quant_type="nf4", double_quant=True, lora_r=64, lora_targets="all", batch_size=1, seq_len=512,
             gradient_checkpointing=True, optimizer="paged_adamw", compute_dtype="bfloat16", lora_dtype="bfloat16",
             device="cuda")


def train_config(**kw):  # the figures in the tests are bf16's; "auto" would make them depend on the CPU
    return build_config({"model": "7B", "batch_size": 8, "max_seq_len": 512, "device": "cpu",
                         "compute_dtype": "bfloat16", **kw})
